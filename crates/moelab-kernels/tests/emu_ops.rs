//! Every CUDA kernel of the cuda_ops harness (tests/cuda_ops.rs), run on the host emulation of
//! the CUDA execution model (feature `cuda-emu`, kernels/emu/) through the launchers' shared
//! launch configurations, against the same CPU references computed in f64 from the same
//! dtype-rounded inputs, with the same tolerances, poisoned outputs and awkward shapes (widths
//! not multiples of the block, sequence lengths not multiples of the tile, uneven expert loads,
//! an empty expert, one expert taking every token), for f32, bf16 and f16, forward and backward.
//! Prints one row per (op, dtype, pass) like cuda_ops; the last check is that every op of
//! scripts/gpu-check.sh's OPS_EXPECTED has rows.
//!
//!   cargo test -p moelab-kernels --features cuda-emu --test emu_ops -- --nocapture
//!
//! What runs where: a backward that candle composes from its own ops on CUDA (RMSNorm's) and the
//! cuBLAS GEMMs (grouped_matmul, the matmuls around causal_attention's softmax and
//! linear_cross_entropy's loss) are device-only; for those composed ops the rows check the moelab
//! kernels they call, at the shapes they call them with. Sizes are cuda_ops' own.
//!
//! Set MOELAB_TEST_SEED to replay a run (the seed is printed).
#![cfg(feature = "cuda-emu")]
#![allow(clippy::unwrap_used, clippy::expect_used)]

use candle_core::{DType, Device, Result, Tensor, Var, WithDType};
use moelab_io::rng::SplitMix64;
use moelab_kernels::emu::{self, Elem};
use moelab_kernels::moe_dispatch::Routing;
use std::sync::Arc;

/// Test data from the shared SplitMix64 stream: deterministic for a given seed.
struct Rng(SplitMix64);

impl Rng {
    fn next_u64(&mut self) -> u64 {
        self.0.next_u64()
    }

    /// Uniform in [-1, 1).
    fn uniform(&mut self) -> f64 {
        self.0.symmetric()
    }

    /// Uniform [-scale, scale) f32 tensor on CPU.
    fn tensor(&mut self, dims: &[usize], scale: f64) -> Tensor {
        let n: usize = dims.iter().product();
        let v: Vec<f32> = (0..n).map(|_| (self.uniform() * scale) as f32).collect();
        Tensor::from_vec(v, dims, &Device::Cpu).unwrap()
    }

    /// `n` class indices below `v`.
    fn targets(&mut self, n: usize, v: usize) -> Vec<u32> {
        (0..n)
            .map(|_| (self.next_u64() % v as u64) as u32)
            .collect()
    }
}

/// The cuda_ops harness's tolerances (see its `tolerance` for the reasoning).
fn tolerance(dtype: DType) -> f64 {
    match dtype {
        DType::F32 => 1e-4,
        DType::BF16 => 3e-2,
        DType::F16 => 1e-2,
        dt => panic!("no tolerance for {dt:?}"),
    }
}

#[derive(Default)]
struct Report {
    rows: Vec<String>,
    failures: Vec<String>,
}

impl Report {
    /// Compares `got` (emulated kernel) with `want` (CPU f64 reference) and prints one row.
    fn compare(&mut self, op: &str, dtype: DType, pass: &str, got: &[f64], want: &[f64]) {
        let label = format!("{op:<46} {:<5} {pass:<8}", format!("{dtype:?}"));
        if got.len() != want.len() {
            return self.fail(format!(
                "{label} {} elements, reference {}",
                got.len(),
                want.len()
            ));
        }
        let nans = got.iter().filter(|v| !v.is_finite()).count();
        let scale = want.iter().fold(0.0f64, |m, v| m.max(v.abs()));
        let diff = got
            .iter()
            .zip(want)
            .fold(0.0f64, |m, (x, y)| m.max((x - y).abs()));
        let err = diff / scale.max(1e-12);
        let tol = tolerance(dtype);
        let ok = nans == 0 && err <= tol;
        let row = format!(
            "{label} max_rel_err {err:>10.3e}  tol {tol:.0e}  max|ref| {scale:>9.3e}  non-finite {nans}  {}",
            if ok { "ok" } else { "FAIL" }
        );
        println!("{row}");
        self.rows.push(row.clone());
        if !ok {
            self.failures.push(row);
        }
    }

    /// A row that is a check of its own (exact comparisons).
    fn check(&mut self, row: String, ok: bool) {
        let row = format!("{row}  {}", if ok { "ok" } else { "FAIL" });
        println!("{row}");
        self.rows.push(row.clone());
        if !ok {
            self.failures.push(row);
        }
    }

    fn fail(&mut self, msg: String) {
        println!("{msg}  FAIL");
        self.rows.push(msg.clone());
        self.failures.push(msg);
    }

    /// Unwraps an emulated launch, recording its error (a race, deadlock or bound report).
    fn ok<R>(&mut self, what: &str, r: Result<R>) -> Option<R> {
        match r {
            Ok(v) => Some(v),
            Err(e) => {
                self.fail(format!("{what}: error: {e}"));
                None
            }
        }
    }
}

fn f64s<T: WithDType>(v: &[T]) -> Vec<f64> {
    v.iter().map(|x| x.to_f64()).collect()
}

/// The elements of `t` (already in T's dtype) as a host vector.
fn host<T: WithDType>(t: &Tensor) -> Vec<T> {
    t.flatten_all().unwrap().to_vec1::<T>().unwrap()
}

fn flat(t: &Tensor) -> Vec<f64> {
    t.to_dtype(DType::F64)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f64>()
        .unwrap()
}

/// The CPU reference in f64 of `op` on `inputs` (dtype-rounded values): its output and the
/// gradients of `(op(inputs) * upstream).sum()` for the inputs marked in `grads`.
fn reference(
    op: impl Fn(&[Tensor]) -> Result<Tensor>,
    inputs: &[Tensor],
    grads: &[bool],
    upstream: Option<&Tensor>,
) -> (Vec<f64>, Vec<Vec<f64>>) {
    let mut vars = Vec::new();
    let mut tensors = Vec::new();
    for (t, g) in inputs.iter().zip(grads) {
        let t = if t.dtype().is_float() {
            t.to_dtype(DType::F64).unwrap()
        } else {
            t.clone()
        };
        if *g {
            let v = Var::from_tensor(&t).unwrap();
            tensors.push(v.as_tensor().clone());
            vars.push(Some(v));
        } else {
            tensors.push(t);
            vars.push(None);
        }
    }
    let y = op(&tensors).unwrap();
    let Some(u) = upstream else {
        return (flat(&y), Vec::new());
    };
    let gs = (&y * u.to_dtype(DType::F64).unwrap())
        .unwrap()
        .sum_all()
        .unwrap()
        .backward()
        .unwrap();
    let grads = vars
        .iter()
        .flatten()
        .map(|v| flat(gs.get(v.as_tensor()).unwrap()))
        .collect();
    (flat(&y), grads)
}

/// One dtype's run of every case.
struct Run<'a> {
    rng: &'a mut Rng,
    report: &'a mut Report,
    dtype: DType,
}

impl Run<'_> {
    /// A random `[-scale, scale)` input rounded to the dtype under test.
    fn input(&mut self, dims: &[usize], scale: f64) -> Tensor {
        let t = self.rng.tensor(dims, scale);
        self.round(&t)
    }

    /// `t` rounded to the dtype under test.
    fn round(&self, t: &Tensor) -> Tensor {
        t.to_dtype(self.dtype).unwrap()
    }

    fn softmax<T: Elem + WithDType>(&mut self, label: &str, dims: &[usize], causal: bool) {
        let x = self.input(dims, 4.0);
        let u = self.input(dims, 1.0);
        let (want_y, want_g) = reference(
            |t| {
                if causal {
                    moelab_kernels::causal_softmax(&t[0])
                } else {
                    moelab_kernels::softmax_last_dim(&t[0])
                }
            },
            std::slice::from_ref(&x),
            &[true],
            Some(&u),
        );
        let Some(y) = self
            .report
            .ok(label, emu::softmax_fwd::<T>(&host(&x), dims, causal))
        else {
            return;
        };
        self.report
            .compare(label, self.dtype, "fwd", &f64s(&y), &want_y);
        if let Some(dx) = self
            .report
            .ok(label, emu::softmax_bwd::<T>(&y, &host(&u), dims))
        {
            self.report
                .compare(label, self.dtype, "bwd dx", &f64s(&dx), &want_g[0]);
        }
    }

    fn rms_norm<T: Elem + WithDType>(&mut self) {
        let label = "rms_norm (3, 37, 1000)";
        let dims = [3usize, 37, 1000];
        let x = self.input(&dims, 2.0);
        let w = self.input(&[1000], 1.5);
        let (want, _) = reference(
            |t| moelab_kernels::rms_norm(&t[0], &t[1], 1e-5),
            &[x.clone(), w.clone()],
            &[false, false],
            None,
        );
        if let Some(y) = self.report.ok(
            label,
            emu::rms_norm_fwd::<T>(&host(&x), &dims, &host(&w), 1e-5),
        ) {
            self.report
                .compare(label, self.dtype, "fwd", &f64s(&y), &want);
        }
    }

    fn rope<T: Elem + WithDType>(&mut self) {
        let label = "rope (2, 3, 37, 64)";
        let dims = [2usize, 3, 37, 64];
        let x = self.input(&dims, 2.0);
        let u = self.input(&dims, 1.0);
        let (cos, sin) =
            moelab_kernels::rope_tables(37, 64, 10_000.0, &Device::Cpu, DType::F32).unwrap();
        let (cos, sin) = (self.round(&cos), self.round(&sin));
        let (want_y, want_g) = reference(
            |t| moelab_kernels::rope(&t[0], &t[1], &t[2]),
            &[x.clone(), cos.clone(), sin.clone()],
            &[true, false, false],
            Some(&u),
        );
        let (cos_h, sin_h) = (host::<T>(&cos), host::<T>(&sin));
        if let Some(y) = self
            .report
            .ok(label, emu::rope_fwd::<T>(&host(&x), &dims, &cos_h, &sin_h))
        {
            self.report
                .compare(label, self.dtype, "fwd", &f64s(&y), &want_y);
        }
        // The backward is the same kernel with -sin (exact in every dtype).
        let neg_sin = host::<T>(&sin.neg().unwrap());
        if let Some(dx) = self.report.ok(
            label,
            emu::rope_fwd::<T>(&host(&u), &dims, &cos_h, &neg_sin),
        ) {
            self.report
                .compare(label, self.dtype, "bwd dx", &f64s(&dx), &want_g[0]);
        }
    }

    /// cross_entropy on `logits (n, v)`, fwd and bwd; `label` names the row.
    fn cross_entropy_on<T: Elem + WithDType>(
        &mut self,
        label: &str,
        logits: &Tensor,
        targets: &[u32],
    ) {
        let (n, v) = logits.dims2().unwrap();
        let u = self.input(&[n], 1.0);
        let t = Tensor::from_slice(targets, n, &Device::Cpu).unwrap();
        let (want_y, want_g) = reference(
            |t| moelab_kernels::cross_entropy(&t[0], &t[1]),
            &[logits.clone(), t],
            &[true, false],
            Some(&u),
        );
        let l = host::<T>(logits);
        if let Some(y) = self
            .report
            .ok(label, emu::cross_entropy_fwd::<T>(&l, n, v, targets))
        {
            self.report
                .compare(label, self.dtype, "fwd", &f64s(&y), &want_y);
        }
        if let Some(d) = self.report.ok(
            label,
            emu::cross_entropy_bwd::<T>(&l, n, v, targets, &host(&u)),
        ) {
            self.report
                .compare(label, self.dtype, "bwd dlogits", &f64s(&d), &want_g[0]);
        }
    }

    fn cross_entropy<T: Elem + WithDType>(&mut self, n: usize, v: usize) {
        let logits = self.input(&[n, v], 8.0);
        let targets = self.rng.targets(n, v);
        self.cross_entropy_on::<T>(&format!("cross_entropy ({n}, {v})"), &logits, &targets);
    }

    fn swiglu<T: Elem + WithDType>(&mut self, dims: &[usize]) {
        let label = format!("swiglu {dims:?}");
        let gate = self.input(dims, 4.0);
        let up = self.input(dims, 2.0);
        let u = self.input(dims, 1.0);
        let (want_y, want_g) = reference(
            |t| moelab_kernels::swiglu(&t[0], &t[1]),
            &[gate.clone(), up.clone()],
            &[true, true],
            Some(&u),
        );
        let (g, up) = (host::<T>(&gate), host::<T>(&up));
        if let Some(y) = self.report.ok(&label, emu::swiglu_fwd::<T>(&g, &up)) {
            self.report
                .compare(&label, self.dtype, "fwd", &f64s(&y), &want_y);
        }
        if let Some(out) = self
            .report
            .ok(&label, emu::swiglu_bwd::<T>(&g, &up, &host(&u)))
        {
            let n = g.len();
            self.report.compare(
                &label,
                self.dtype,
                "bwd dgate",
                &f64s(&out[..n]),
                &want_g[0],
            );
            self.report
                .compare(&label, self.dtype, "bwd dup", &f64s(&out[n..]), &want_g[1]);
        }
    }

    /// The MoE dispatch cases of one routing, as cuda_ops' `moe_cases`: the permute alone and
    /// permute -> un-permute, forward and backward through the kernels the CUDA ops launch
    /// (the permute's backward is the combine with unit gates).
    fn moe<T: Elem + WithDType>(
        &mut self,
        label: &str,
        token_of_row: Vec<u32>,
        n_tokens: usize,
        d: usize,
    ) {
        let rows = token_of_row.len();
        let routing = Routing::new(token_of_row, n_tokens).unwrap();
        let ones = vec![T::from_f64(1.0); rows];
        // The permute alone.
        let name = format!("moe permute {label}");
        let x = self.input(&[n_tokens, d], 1.0);
        let u = self.input(&[rows, d], 1.0);
        let r = routing.clone();
        let (want_y, want_g) = reference(
            move |t| moelab_kernels::moe_dispatch::permute(&t[0], &r),
            std::slice::from_ref(&x),
            &[true],
            Some(&u),
        );
        if let Some(y) = self
            .report
            .ok(&name, emu::moe_permute::<T>(&host(&x), d, &routing))
        {
            self.report
                .compare(&name, self.dtype, "fwd", &f64s(&y), &want_y);
        }
        if let Some(dx) = self.report.ok(
            &name,
            emu::moe_unpermute::<T>(&host(&u), &ones, d, &routing),
        ) {
            self.report
                .compare(&name, self.dtype, "bwd dx", &f64s(&dx), &want_g[0]);
        }
        // Permute, then the gated un-permute.
        let name = format!("moe permute + unpermute {label}");
        let x = self.input(&[n_tokens, d], 1.0);
        let gates = self.input(&[rows], 1.0);
        let u = self.input(&[n_tokens, d], 1.0);
        let r = routing.clone();
        let (want_y, want_g) = reference(
            move |t| {
                let rows = moelab_kernels::moe_dispatch::permute(&t[0], &r)?;
                moelab_kernels::moe_dispatch::unpermute(&rows, &t[1], &r)
            },
            &[x.clone(), gates.clone()],
            &[true, true],
            Some(&u),
        );
        self.moe_combine::<T>(
            &name,
            (&x, &gates, &u),
            d,
            &routing,
            &ones,
            (&want_y, &want_g),
        );
    }

    fn moe_combine<T: Elem + WithDType>(
        &mut self,
        name: &str,
        (x, gates, u): (&Tensor, &Tensor, &Tensor),
        d: usize,
        routing: &Arc<Routing>,
        ones: &[T],
        (want_y, want_g): (&[f64], &[Vec<f64>]),
    ) {
        let gates = host::<T>(gates);
        let Some(permuted) = self
            .report
            .ok(name, emu::moe_permute::<T>(&host(x), d, routing))
        else {
            return;
        };
        if let Some(y) = self
            .report
            .ok(name, emu::moe_unpermute::<T>(&permuted, &gates, d, routing))
        {
            self.report
                .compare(name, self.dtype, "fwd", &f64s(&y), want_y);
        }
        let Some(back) = self.report.ok(
            name,
            emu::moe_unpermute_bwd::<T>(&permuted, &gates, &host(u), d, routing),
        ) else {
            return;
        };
        let rows = gates.len();
        let (d_rows, d_gates) = back.split_at(rows * d);
        if let Some(dx) = self
            .report
            .ok(name, emu::moe_unpermute::<T>(d_rows, ones, d, routing))
        {
            self.report
                .compare(name, self.dtype, "bwd dx", &f64s(&dx), &want_g[0]);
        }
        self.report
            .compare(name, self.dtype, "bwd dgates", &f64s(d_gates), &want_g[1]);
    }

    fn moe_cases<T: Elem + WithDType>(&mut self) {
        // 7 tokens, 15 rows: token 5 gets no row, token 0 four.
        let token_of_row = vec![0u32, 3, 0, 1, 6, 0, 2, 4, 0, 3, 1, 6, 2, 4, 3];
        self.moe::<T>("7 tokens -> 15 rows x 96", token_of_row, 7, 96);
        // Uneven loads with an empty expert: 37 tokens top-2 of 6 experts, expert 0 chosen by
        // about half the tokens, expert 2 by none.
        let mut experts = Vec::new();
        for _ in 0..37 {
            let pick = |rng: &mut Rng| [1u32, 3, 4, 5][(rng.next_u64() % 4) as usize];
            let first = if self.rng.uniform() < 0.0 {
                0
            } else {
                pick(self.rng)
            };
            let mut second = pick(self.rng);
            while second == first {
                second = pick(self.rng);
            }
            experts.extend([first, second]);
        }
        let (token_of_row, loads) = expert_major(&experts, 2, 6);
        assert_eq!(loads[2], 0);
        self.moe::<T>(
            &format!("37 tokens top-2, loads {loads:?}, x 97"),
            token_of_row,
            37,
            97,
        );
        // One expert takes every token (top-1, the other three empty).
        let (token_of_row, loads) = expert_major(&[3; 41], 1, 4);
        self.moe::<T>(
            &format!("41 tokens top-1, loads {loads:?}, x 300"),
            token_of_row,
            41,
            300,
        );
    }

    /// Flash attention through its kernels (f32: bf16/f16 inputs are converted first, as the
    /// op's wrapper does), against the CPU tiled op.
    fn flash_attention(&mut self, t: usize, d: usize) {
        let label = format!("flash_attention q(2,4,{t},{d}) kv(2,2,{t},{d})");
        let shape = (2, 4, 2, t, d);
        let q = self.input(&[2, 4, t, d], 1.0);
        let k = self.input(&[2, 2, t, d], 1.0);
        let v = self.input(&[2, 2, t, d], 1.0);
        let u = self.input(&[2, 4, t, d], 1.0);
        let scale = 1.0 / (d as f64).sqrt();
        let (want_y, want_g) = reference(
            |x| moelab_kernels::flash_attention::flash_attention_fused(&x[0], &x[1], &x[2], scale),
            &[q.clone(), k.clone(), v.clone()],
            &[true, true, true],
            Some(&u),
        );
        let f32s = |t: &Tensor| host::<f32>(&t.to_dtype(DType::F32).unwrap());
        let (q, k, v, u) = (f32s(&q), f32s(&k), f32s(&v), f32s(&u));
        let Some(out) = self
            .report
            .ok(&label, emu::flash_attention_fwd(&q, &k, &v, shape, scale))
        else {
            return;
        };
        let (nq, nl) = (q.len(), q.len() / d);
        // The op's output in the dtype under test (the wrapper converts O back).
        let o: Vec<f64> = out[..nq].iter().map(|&x| round_to(self.dtype, x)).collect();
        self.report.compare(&label, self.dtype, "fwd", &o, &want_y);
        let mut saved = out.clone();
        saved.extend_from_slice(&u);
        saved.extend(std::iter::repeat_n(0.0f32, nl));
        let kv: Vec<f32> = k.iter().chain(&v).copied().collect();
        let Some(g) = self.report.ok(
            &label,
            emu::flash_attention_bwd(&q, &kv, &saved, shape, scale),
        ) else {
            return;
        };
        let nk = k.len();
        let parts = [
            (&g[..nq], "bwd dq"),
            (&g[nq..nq + nk], "bwd dk"),
            (&g[nq + nk..], "bwd dv"),
        ];
        for (i, (part, pass)) in parts.into_iter().enumerate() {
            let part: Vec<f64> = part.iter().map(|&x| round_to(self.dtype, x)).collect();
            self.report
                .compare(&label, self.dtype, pass, &part, &want_g[i]);
        }
    }

    fn sum_of_squares<T: Elem + WithDType>(&mut self) {
        let label = "sum_of_squares (300001,)";
        let x = self.input(&[300_001], 2.0);
        let want: f64 = flat(&x).iter().map(|v| v * v).sum();
        if let Some(got) = self.report.ok(label, emu::sum_of_squares::<T>(&host(&x))) {
            let err = (got as f64 - want).abs() / want;
            let row = format!(
                "{label:<46} {:<5} fwd      rel_err {err:>10.3e}  tol 1e-5",
                format!("{:?}", self.dtype)
            );
            self.report.check(row, err < 1e-5);
        }
    }

    fn router_topk<T: Elem + WithDType>(&mut self) {
        for (tokens, n_experts, k, with_bias, ties) in [
            (37usize, 64usize, 8usize, true, false),
            (300, 7, 2, false, true),
            (5, 300, 3, true, false),
        ] {
            let label = format!("router_topk ({tokens}, {n_experts}) k{k}");
            let mut scores = self.rng.tensor(&[tokens, n_experts], 1.0);
            if ties {
                scores = ((scores * 4.0).unwrap().round().unwrap() / 4.0).unwrap();
            }
            let scores = self.round(&scores);
            let bias = with_bias.then(|| self.rng.tensor(&[n_experts], 0.1));
            let want = moelab_kernels::router_topk(&scores, bias.as_ref(), k).unwrap();
            let want_ids: Vec<u32> = host(&want.expert_ids);
            let want_counts: Vec<u32> = host(&want.counts);
            let bias_h = bias.as_ref().map(host::<f32>);
            let got = emu::router_topk::<T>(&host(&scores), n_experts, bias_h.as_deref(), k);
            if let Some((ids, counts)) = self.report.ok(&label, got) {
                let bad = ids
                    .chunks(k)
                    .zip(want_ids.chunks(k))
                    .filter(|(a, b)| a != b)
                    .count();
                let row = format!(
                    "{label:<46} {:<5} fwd      {bad} of {tokens} rows differ, counts {}",
                    format!("{:?}", self.dtype),
                    if counts == want_counts {
                        "equal"
                    } else {
                        "differ"
                    }
                );
                self.report.check(row, bad == 0 && counts == want_counts);
            }
        }
    }
}

/// `x` rounded to `dtype` (the emulated flash kernels compute in f32; the op returns the dtype).
fn round_to(dtype: DType, x: f32) -> f64 {
    match dtype {
        DType::BF16 => half::bf16::from_f32(x).to_f64(),
        DType::F16 => half::f16::from_f32(x).to_f64(),
        _ => x as f64,
    }
}

/// Rows in expert order (grouped by expert, tokens ascending), as cuda_ops' `expert_major`.
fn expert_major(experts: &[u32], k: usize, n_experts: usize) -> (Vec<u32>, Vec<usize>) {
    let mut loads = vec![0usize; n_experts];
    let mut token_of_row = Vec::with_capacity(experts.len());
    for e in 0..n_experts as u32 {
        for (slot, _) in experts.iter().enumerate().filter(|(_, &x)| x == e) {
            token_of_row.push((slot / k) as u32);
            loads[e as usize] += 1;
        }
    }
    (token_of_row, loads)
}

/// Every case of one dtype, in cuda_ops' order.
fn run_dtype<T: Elem + WithDType>(run: &mut Run<'_>) {
    for dims in [[37usize, 1000].as_slice(), &[2, 5, 77]] {
        run.softmax::<T>(&format!("softmax_last_dim {dims:?}"), dims, false);
    }
    for dims in [[2usize, 3, 37, 53], [1, 2, 300, 300]] {
        run.softmax::<T>(&format!("causal_softmax {dims:?}"), &dims, true);
    }
    run.rms_norm::<T>();
    run.rope::<T>();
    for (n, v) in [(37usize, 50_304usize), (65, 1000)] {
        run.cross_entropy::<T>(n, v);
    }
    for dims in [[37usize, 1000].as_slice(), &[3, 5, 77]] {
        run.swiglu::<T>(dims);
    }
    run.moe_cases::<T>();
    // causal_attention is composed on CUDA (cuBLAS matmuls around this kernel): its causal
    // softmax at the scores' shape for q(2,4,37,64).
    run.softmax::<T>(
        "causal_attention q(2,4,37,64): causal_softmax (2,4,37,37)",
        &[2, 4, 37, 37],
        true,
    );
    for (t, d) in [(37usize, 64usize), (130, 128)] {
        run.flash_attention(t, d);
    }
    // linear_cross_entropy is composed on CUDA: the cuBLAS matmul, then this kernel on the
    // logits (rounded to the dtype as the matmul's output is).
    let h = run.rng.tensor(&[37, 64], 1.0);
    let w = run.rng.tensor(&[1000, 64], 0.5);
    let logits = run.round(&h.matmul(&w.t().unwrap()).unwrap());
    let targets = run.rng.targets(37, 1000);
    run.cross_entropy_on::<T>(
        "linear_cross_entropy h(37,64) w(1000,64): cross_entropy",
        &logits,
        &targets,
    );
    run.sum_of_squares::<T>();
    run.router_topk::<T>();
}

/// AdamW's composed update (the optimizer's fallback) on the CPU: the new (param, m, v).
fn composed_adamw(
    p: &Tensor,
    m: &Tensor,
    v: &Tensor,
    g: &Tensor,
    u: &moelab_kernels::AdamWUpdate,
) -> [Tensor; 3] {
    let g = (g * u.grad_scale).unwrap();
    let m = ((m * u.beta1).unwrap() + (&g * (1.0 - u.beta1)).unwrap()).unwrap();
    let v = ((v * u.beta2).unwrap() + (g.sqr().unwrap() * (1.0 - u.beta2)).unwrap()).unwrap();
    let step = ((&m / u.correction1).unwrap()
        / ((&v / u.correction2).unwrap().sqrt().unwrap() + u.eps).unwrap())
    .unwrap();
    let p = ((p * (1.0 - u.decay)).unwrap() - (step * u.lr).unwrap()).unwrap();
    [p, m, v]
}

/// The fused AdamW kernel over three steps against the composed update on the CPU, bit for bit.
fn check_adamw(report: &mut Report, rng: &mut Rng) {
    let label = "adamw_update f32 (50001,) x 3 steps";
    let n = 50_001;
    let p0 = rng.tensor(&[n], 1.0);
    let zeros = Tensor::zeros(n, DType::F32, &Device::Cpu).unwrap();
    let mut fused = [host::<f32>(&p0), vec![0.0f32; n], vec![0.0f32; n]];
    let mut cpu = [p0, zeros.clone(), zeros];
    for step in 1..=3i32 {
        let g = rng.tensor(&[n], 0.5);
        let u = moelab_kernels::AdamWUpdate {
            lr: 1e-2,
            beta1: 0.9,
            beta2: 0.95,
            eps: 1e-8,
            decay: 1e-3,
            correction1: 1.0 - 0.9f64.powi(step),
            correction2: 1.0 - 0.95f64.powi(step),
            grad_scale: 0.7,
        };
        let [p, m, v] = &mut fused;
        if report
            .ok(label, emu::adamw_step(p, m, v, &host(&g), &u))
            .is_none()
        {
            return;
        }
        let [p, m, v] = &cpu;
        cpu = composed_adamw(p, m, v, &g, &u);
    }
    for (i, what) in ["param", "m", "v"].iter().enumerate() {
        let want = host::<f32>(&cpu[i]);
        let diff = fused[i]
            .iter()
            .zip(&want)
            .fold(0.0f64, |d, (a, b)| d.max((a - b).abs() as f64));
        let nans = fused[i].iter().filter(|v| !v.is_finite()).count();
        let row = format!("{label:<46} F32   {what:<8} max|fused - composed| against CPU {diff:.3e}  non-finite {nans}");
        report.check(row, nans == 0 && diff == 0.0);
    }
}

/// The device dispatch plan (kernels/moe_plan.cu) against the host plan (`Routing::new` of the
/// expert-major rows), exactly: an empty expert with uneven loads, one expert taking every
/// token, and 300 tokens top-8 of 64 (more assignments than a block covers in one sweep).
fn check_moe_plan(report: &mut Report, rng: &mut Rng) {
    let mut cases: Vec<(Vec<u32>, usize, usize)> = Vec::new();
    let mut ids = Vec::new();
    for _ in 0..37 {
        let a = [0u32, 1, 3, 4, 5][(rng.next_u64() % 5) as usize];
        let mut b = [0u32, 1, 3, 4, 5][(rng.next_u64() % 5) as usize];
        while b == a {
            b = [0u32, 1, 3, 4, 5][(rng.next_u64() % 5) as usize];
        }
        ids.extend([a, b]);
    }
    cases.push((ids, 2, 6));
    cases.push((vec![3; 41], 1, 4));
    let mut ids = Vec::new();
    for _ in 0..300 {
        let mut chosen: Vec<u32> = Vec::new();
        while chosen.len() < 8 {
            let e = (rng.next_u64() % 64) as u32;
            if !chosen.contains(&e) {
                chosen.push(e);
            }
        }
        ids.extend(chosen);
    }
    cases.push((ids, 8, 64));
    // The model's device routing end to end: router_topk's ids and histogram (emulated, equal
    // to the CPU's) feed the plan, as `moe.rs` chains them on CUDA.
    let scores = rng.tensor(&[256, 16], 1.0);
    let want = moelab_kernels::router_topk(&scores, None, 4).unwrap();
    let want_ids: Vec<u32> = host(&want.expert_ids);
    let got = emu::router_topk::<f32>(&host(&scores), 16, None, 4);
    if let Some((ids, counts)) = report.ok("moe plan from router_topk", got) {
        let loads = expert_major(&ids, 4, 16).1;
        let ok = ids == want_ids && counts.iter().map(|&c| c as usize).eq(loads.iter().copied());
        report.check(
            format!(
                "{:<46} U32   topk     ids and histogram {}",
                "moe plan from router_topk (256, 16) k4",
                if ok { "equal" } else { "differ" }
            ),
            ok,
        );
        cases.push((ids, 4, 16));
    }
    for (ids, k, n_experts) in cases {
        let tokens = ids.len() / k;
        let (token_of_row, loads) = expert_major(&ids, k, n_experts);
        let label = format!("moe plan {tokens} tokens top-{k} of {n_experts}");
        let want_index = Routing::new(token_of_row, tokens).unwrap().packed_index();
        let mut want_assign = Vec::new();
        for e in 0..n_experts as u32 {
            want_assign.extend((0..ids.len() as u32).filter(|&a| ids[a as usize] == e));
        }
        if let Some((index, assign)) = report.ok(&label, emu::moe_plan(&ids, &loads, k)) {
            let ok = index == want_index && assign == want_assign;
            report.check(
                format!(
                    "{label:<46} U32   plan     index and assignments {}",
                    if ok { "equal" } else { "differ" }
                ),
                ok,
            );
        }
    }
}

/// The op-name patterns of scripts/gpu-check.sh's OPS_EXPECTED (bash words, quotes removed).
fn ops_expected() -> Vec<String> {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../../scripts/gpu-check.sh");
    let text = std::fs::read_to_string(path).unwrap();
    let start = text
        .find("OPS_EXPECTED=(")
        .expect("OPS_EXPECTED in gpu-check.sh")
        + "OPS_EXPECTED=(".len();
    let body = &text[start..start + text[start..].find(')').unwrap()];
    let mut words = Vec::new();
    let mut rest = body.trim();
    while !rest.is_empty() {
        let (word, tail) = match rest.strip_prefix('"') {
            Some(q) => {
                let end = q.find('"').unwrap();
                (&q[..end], &q[end + 1..])
            }
            None => rest.split_at(rest.find(char::is_whitespace).unwrap_or(rest.len())),
        };
        words.push(word.to_string());
        rest = tail.trim_start();
    }
    words
}

/// Whether `row` starts with the grep pattern `pat` (literal text and `[0-9]` only).
fn starts_with_pattern(row: &str, pat: &str) -> bool {
    let (lit, digit) = match pat.strip_suffix("[0-9]") {
        Some(l) => (l, true),
        None => (pat, false),
    };
    row.strip_prefix(lit)
        .is_some_and(|r| !digit || r.starts_with(|c: char| c.is_ascii_digit()))
}

/// Ops whose CUDA path is cuBLAS alone: nothing of ours to emulate (device-only).
const DEVICE_ONLY: &[&str] = &["grouped_matmul"];

#[test]
fn emulated_kernels_match_cpu_reference() {
    let seed = std::env::var("MOELAB_TEST_SEED")
        .ok()
        .map(|s| {
            s.parse::<u64>()
                .expect("MOELAB_TEST_SEED must be an integer")
        })
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos() as u64)
                .unwrap_or(0)
        });
    println!("emu_ops: seed {seed} (replay with MOELAB_TEST_SEED={seed})");
    let started = std::time::Instant::now();
    let mut rng = Rng(SplitMix64::new(seed));
    let mut report = Report::default();
    for dtype in [DType::F32, DType::BF16, DType::F16] {
        let mut run = Run {
            rng: &mut rng,
            report: &mut report,
            dtype,
        };
        match dtype {
            DType::F32 => run_dtype::<f32>(&mut run),
            DType::BF16 => run_dtype::<half::bf16>(&mut run),
            _ => run_dtype::<half::f16>(&mut run),
        }
    }
    check_adamw(&mut report, &mut rng);
    check_moe_plan(&mut report, &mut rng);
    let missing: Vec<String> = ops_expected()
        .into_iter()
        .filter(|p| !DEVICE_ONLY.contains(&p.as_str()))
        .filter(|p| !report.rows.iter().any(|r| starts_with_pattern(r, p)))
        .collect();
    println!(
        "emu_ops: {} rows, {} failures, {:.1} s; device-only (cuBLAS): {DEVICE_ONLY:?}",
        report.rows.len(),
        report.failures.len(),
        started.elapsed().as_secs_f64()
    );
    assert!(
        missing.is_empty(),
        "no rows for OPS_EXPECTED ops {missing:?}"
    );
    assert!(
        report.failures.is_empty(),
        "seed {seed}: {} failures:\n{}",
        report.failures.len(),
        report.failures.join("\n")
    );
}
