//! GPU check: every op's CUDA forward and backward against the CPU reference computed in f64
//! from the same (dtype-rounded) inputs, on random data and awkward shapes, for f32, bf16 and
//! f16. Outputs are poisoned (MOELAB_POISON_OUTPUTS=1), so an element a kernel never writes is
//! NaN and fails the check. Prints one line per (op, dtype, pass) so the log reads as a table.
//!
//!   cargo test --release --features cuda -p moelab-kernels --test cuda_ops -- --nocapture
//!
//! Set MOELAB_TEST_SEED to replay a run (the seed is printed). Without a CUDA device the test
//! prints "skipped: no CUDA device" and passes.
#![cfg(feature = "cuda")]
#![allow(clippy::unwrap_used, clippy::expect_used)]

use candle_core::{DType, Device, Result, Tensor, Var};
use moelab_io::rng::SplitMix64;

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

    /// `n` class indices below `v` as a u32 tensor on CPU.
    fn targets(&mut self, n: usize, v: usize) -> Tensor {
        let t: Vec<u32> = (0..n)
            .map(|_| (self.next_u64() % v as u64) as u32)
            .collect();
        Tensor::from_vec(t, n, &Device::Cpu).unwrap()
    }
}

type OpFn = Box<dyn Fn(&[Tensor]) -> Result<Tensor>>;

/// One op on one set of inputs.
struct Case {
    name: String,
    /// CPU inputs: f32 ones are rounded to the dtype under test, others (u32 targets) kept.
    inputs: Vec<Tensor>,
    /// Names of the inputs that are differentiated (None: not differentiated).
    grads: Vec<Option<&'static str>>,
    op: OpFn,
}

/// Largest error a dtype may show, relative to the largest reference magnitude.
///
/// f32: the kernels accumulate in f32 against the f64 reference, over at most ~50k terms
/// (cross-entropy rows), which costs ~1e-6 (this harness run on the CPU f32 ops measures
/// 3e-8..2e-6); 1e-4 leaves margin yet catches any indexing or reduction bug (O(1) errors).
/// bf16 (8 significant bits): each stored result is rounded with relative error up to
/// 2^-9 ~ 2e-3, and composed ops (attention: matmul -> softmax -> matmul and the backwards)
/// round intermediates 3-4 times; the CPU bf16 ops measure 1e-4..6e-3 here, so 3e-2 leaves
/// ~5x margin and is still far below what a wrong kernel gives.
/// f16 (11 significant bits): 8x finer roundings; the CPU f16 ops measure 1e-4..1.5e-3.
fn tolerance(dtype: DType) -> f64 {
    match dtype {
        DType::F32 => 1e-4,
        DType::BF16 => 3e-2,
        DType::F16 => 1e-2,
        dt => panic!("no tolerance for {dt:?}"),
    }
}

/// Collects the table rows and the failures.
#[derive(Default)]
struct Report {
    failures: Vec<String>,
}

impl Report {
    /// Compares `got` (device) with `want` (CPU f64 reference) and prints one row.
    fn compare(&mut self, op: &str, dtype: DType, pass: &str, got: &Tensor, want: &Tensor) {
        let label = format!("{op:<46} {:<5} {pass:<8}", format!("{dtype:?}"));
        if got.dims() != want.dims() {
            let msg = format!("{label} shape {:?} != {:?}", got.dims(), want.dims());
            println!("{msg}  FAIL");
            self.failures.push(msg);
            return;
        }
        let a = flat_f64(got);
        let b = flat_f64(want);
        let nans = a.iter().filter(|v| !v.is_finite()).count();
        let scale = b.iter().fold(0.0f64, |m, v| m.max(v.abs()));
        let diff = a
            .iter()
            .zip(&b)
            .fold(0.0f64, |m, (x, y)| m.max((x - y).abs()));
        let err = diff / scale.max(1e-12);
        let tol = tolerance(dtype);
        let ok = nans == 0 && err <= tol;
        println!(
            "{label} max_rel_err {err:>10.3e}  tol {tol:.0e}  max|ref| {scale:>9.3e}  non-finite {nans}  {}",
            if ok { "ok" } else { "FAIL" }
        );
        if !ok {
            self.failures.push(format!(
                "{label}: max_rel_err {err:.3e} (tol {tol:.0e}), {nans} non-finite values"
            ));
        }
    }

    /// Records an op that returned an error instead of a result.
    fn error(&mut self, op: &str, dtype: DType, pass: &str, e: impl std::fmt::Display) {
        let msg = format!("{op} {dtype:?} {pass}: error: {e}");
        println!("{msg}  FAIL");
        self.failures.push(msg);
    }
}

fn flat_f64(t: &Tensor) -> Vec<f64> {
    t.to_device(&Device::Cpu)
        .unwrap()
        .to_dtype(DType::F64)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f64>()
        .unwrap()
}

/// Output and input gradients of `(op(inputs) * upstream).sum()` on `device`, with float
/// inputs cast to `dtype`.
fn forward_backward(
    case: &Case,
    inputs: &[Tensor],
    upstream: Option<&Tensor>,
    device: &Device,
    dtype: DType,
) -> Result<(Tensor, Vec<Option<Tensor>>)> {
    let mut vars = Vec::new();
    let mut tensors = Vec::new();
    for (t, grad) in inputs.iter().zip(&case.grads) {
        let t = if t.dtype().is_float() {
            t.to_dtype(dtype)?
        } else {
            t.clone()
        };
        let t = t.to_device(device)?;
        if grad.is_some() {
            let v = Var::from_tensor(&t)?;
            tensors.push(v.as_tensor().clone());
            vars.push(Some(v));
        } else {
            tensors.push(t);
            vars.push(None);
        }
    }
    let y = (case.op)(&tensors)?;
    let Some(upstream) = upstream else {
        return Ok((y, Vec::new()));
    };
    let r = upstream.to_dtype(dtype)?.to_device(device)?;
    let grads = (&y * &r)?.sum_all()?.backward()?;
    let grads = vars
        .iter()
        .map(|v| v.as_ref().and_then(|v| grads.get(v.as_tensor()).cloned()))
        .collect();
    Ok((y, grads))
}

fn run_case(report: &mut Report, rng: &mut Rng, cuda: &Device, dtype: DType, case: &Case) {
    // Round once to the dtype under test; the reference sees exactly these values in f64.
    let rounded: Vec<Tensor> = case
        .inputs
        .iter()
        .map(|t| {
            if t.dtype().is_float() {
                t.to_dtype(dtype).unwrap()
            } else {
                t.clone()
            }
        })
        .collect();
    let (y_shape_probe, _) =
        forward_backward(case, &rounded, None, &Device::Cpu, DType::F64).unwrap();
    let upstream = rng
        .tensor(y_shape_probe.dims(), 1.0)
        .to_dtype(dtype)
        .unwrap();
    let (want_y, want_grads) =
        forward_backward(case, &rounded, Some(&upstream), &Device::Cpu, DType::F64).unwrap();
    let (got_y, got_grads) = match forward_backward(case, &rounded, Some(&upstream), cuda, dtype) {
        Ok(r) => r,
        Err(e) => return report.error(&case.name, dtype, "fwd+bwd", e),
    };
    if got_y.dtype() != dtype {
        report.error(
            &case.name,
            dtype,
            "fwd",
            format!("output dtype {:?}", got_y.dtype()),
        );
    }
    report.compare(&case.name, dtype, "fwd", &got_y, &want_y);
    for ((name, got), want) in case.grads.iter().zip(&got_grads).zip(&want_grads) {
        let Some(name) = name else { continue };
        let pass = format!("bwd d{name}");
        match (got, want) {
            (Some(g), Some(w)) => report.compare(&case.name, dtype, &pass, g, w),
            _ => report.error(&case.name, dtype, &pass, "missing gradient"),
        }
    }
}

/// The ops and shapes under test; widths are deliberately not multiples of the block size.
fn cases(rng: &mut Rng) -> Vec<Case> {
    let mut cases = Vec::new();
    for dims in [[37usize, 1000].as_slice(), &[2, 5, 77]] {
        cases.push(Case {
            name: format!("softmax_last_dim {dims:?}"),
            inputs: vec![rng.tensor(dims, 4.0)],
            grads: vec![Some("x")],
            op: Box::new(|t| moelab_kernels::softmax_last_dim(&t[0])),
        });
    }
    for dims in [[2usize, 3, 37, 53], [1, 2, 300, 300]] {
        cases.push(Case {
            name: format!("causal_softmax {dims:?}"),
            inputs: vec![rng.tensor(&dims, 4.0)],
            grads: vec![Some("x")],
            op: Box::new(|t| moelab_kernels::causal_softmax(&t[0])),
        });
    }
    cases.push(Case {
        name: "rms_norm (3, 37, 1000)".into(),
        inputs: vec![rng.tensor(&[3, 37, 1000], 2.0), rng.tensor(&[1000], 1.5)],
        grads: vec![Some("x"), Some("w")],
        op: Box::new(|t| moelab_kernels::rms_norm(&t[0], &t[1], 1e-5)),
    });
    let (cos, sin) =
        moelab_kernels::rope_tables(37, 64, 10_000.0, &Device::Cpu, DType::F32).unwrap();
    cases.push(Case {
        name: "rope (2, 3, 37, 64)".into(),
        inputs: vec![rng.tensor(&[2, 3, 37, 64], 2.0), cos, sin],
        grads: vec![Some("x"), None, None],
        op: Box::new(|t| moelab_kernels::rope(&t[0], &t[1], &t[2])),
    });
    for (n, v) in [(37usize, 50_304usize), (65, 1000)] {
        cases.push(Case {
            name: format!("cross_entropy ({n}, {v})"),
            inputs: vec![rng.tensor(&[n, v], 8.0), rng.targets(n, v)],
            grads: vec![Some("logits"), None],
            op: Box::new(|t| moelab_kernels::cross_entropy(&t[0], &t[1])),
        });
    }
    // Group 1 is empty: its weight gradient must come out exactly zero (not poison).
    let sizes = [13usize, 0, 37, 1, 20];
    let n: usize = sizes.iter().sum();
    cases.push(Case {
        name: format!("grouped_matmul {sizes:?} K200 M96"),
        inputs: vec![rng.tensor(&[n, 200], 1.0), rng.tensor(&[5, 96, 200], 1.0)],
        grads: vec![Some("x"), Some("w")],
        op: Box::new(move |t| moelab_kernels::grouped_matmul(&t[0], &t[1], &sizes)),
    });
    for dims in [[37usize, 1000].as_slice(), &[3, 5, 77]] {
        cases.push(Case {
            name: format!("swiglu {dims:?}"),
            inputs: vec![rng.tensor(dims, 4.0), rng.tensor(dims, 2.0)],
            grads: vec![Some("gate"), Some("up")],
            op: Box::new(|t| moelab_kernels::swiglu(&t[0], &t[1])),
        });
    }
    // 7 tokens, 15 rows: token 5 gets no row, token 0 four.
    let token_of_row = vec![0u32, 3, 0, 1, 6, 0, 2, 4, 0, 3, 1, 6, 2, 4, 3];
    moe_cases(
        &mut cases,
        rng,
        "7 tokens -> 15 rows x 96",
        token_of_row,
        7,
        96,
    );
    // Routings as the model builds them (rows grouped by expert, tokens in order within one).
    // Uneven loads with an empty expert: 37 tokens top-2 of 6 experts, expert 0 chosen by about
    // half the tokens, expert 2 by none.
    let mut experts = Vec::new();
    for _ in 0..37 {
        let pick = |rng: &mut Rng| [1u32, 3, 4, 5][(rng.next_u64() % 4) as usize];
        let first = if rng.uniform() < 0.0 { 0 } else { pick(rng) };
        let mut second = pick(rng);
        while second == first {
            second = pick(rng);
        }
        experts.extend([first, second]);
    }
    let (token_of_row, loads) = expert_major(&experts, 2, 6);
    assert_eq!(loads[2], 0);
    let label = format!("37 tokens top-2, loads {loads:?}, x 97");
    moe_cases(&mut cases, rng, &label, token_of_row, 37, 97);
    // One expert takes every token (top-1, the other three empty).
    let (token_of_row, loads) = expert_major(&[3; 41], 1, 4);
    let label = format!("41 tokens top-1, loads {loads:?}, x 300");
    moe_cases(&mut cases, rng, &label, token_of_row, 41, 300);
    cases.push(Case {
        name: "causal_attention q(2,4,37,64) kv(2,2,37,64)".into(),
        inputs: vec![
            rng.tensor(&[2, 4, 37, 64], 1.0),
            rng.tensor(&[2, 2, 37, 64], 1.0),
            rng.tensor(&[2, 2, 37, 64], 1.0),
        ],
        grads: vec![Some("q"), Some("k"), Some("v")],
        op: Box::new(|t| moelab_kernels::causal_attention(&t[0], &t[1], &t[2], 0.125)),
    });
    // The fused attention kernels (kernels/flash_attention.cu) through the entry that never
    // falls back to the composed ops; the CPU reference is the tiled op. T = 37 and 130 are not
    // multiples of the kernels' 64-row blocks or 32-row tiles; D = 64 and 128 (the kernels'
    // maximum); 2 query heads per kv head.
    for (t, d) in [(37usize, 64usize), (130, 128)] {
        cases.push(Case {
            name: format!("flash_attention q(2,4,{t},{d}) kv(2,2,{t},{d})"),
            inputs: vec![
                rng.tensor(&[2, 4, t, d], 1.0),
                rng.tensor(&[2, 2, t, d], 1.0),
                rng.tensor(&[2, 2, t, d], 1.0),
            ],
            grads: vec![Some("q"), Some("k"), Some("v")],
            op: Box::new(move |x| {
                let scale = 1.0 / (d as f64).sqrt();
                moelab_kernels::flash_attention::flash_attention_fused(&x[0], &x[1], &x[2], scale)
            }),
        });
    }
    // The model's entry point: tiled on the CPU (the reference here), composed on CUDA until its
    // fused kernel exists; the check is that the device path gives the same numbers.
    cases.push(Case {
        name: "linear_cross_entropy h(37,64) w(1000,64)".into(),
        inputs: vec![
            rng.tensor(&[37, 64], 1.0),
            rng.tensor(&[1000, 64], 0.5),
            rng.targets(37, 1000),
        ],
        grads: vec![Some("h"), Some("w"), None],
        op: Box::new(|t| moelab_kernels::linear_cross_entropy(&t[0], &t[1], &t[2])),
    });
    cases
}

/// Rows in expert order for `experts` (token t's `k` choices at `t * k ..`): grouped by expert,
/// tokens ascending within a group, as the model's dispatch plan. Returns `token_of_row` and the
/// per-expert loads.
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

/// The MoE dispatch cases of one routing: the permute alone (rows, and dx through the permute's
/// backward) and permute -> un-permute (the gated combine; dx and the gates' gradient through
/// both backwards).
fn moe_cases(
    cases: &mut Vec<Case>,
    rng: &mut Rng,
    label: &str,
    token_of_row: Vec<u32>,
    n_tokens: usize,
    d: usize,
) {
    let rows = token_of_row.len();
    let routing = moelab_kernels::moe_dispatch::Routing::new(token_of_row, n_tokens).unwrap();
    let r = routing.clone();
    cases.push(Case {
        name: format!("moe permute {label}"),
        inputs: vec![rng.tensor(&[n_tokens, d], 1.0)],
        grads: vec![Some("x")],
        op: Box::new(move |t| moelab_kernels::moe_dispatch::permute(&t[0], &r)),
    });
    cases.push(Case {
        name: format!("moe permute + unpermute {label}"),
        inputs: vec![rng.tensor(&[n_tokens, d], 1.0), rng.tensor(&[rows], 1.0)],
        grads: vec![Some("x"), Some("gates")],
        op: Box::new(move |t| {
            let rows = moelab_kernels::moe_dispatch::permute(&t[0], &routing)?;
            moelab_kernels::moe_dispatch::unpermute(&rows, &t[1], &routing)
        }),
    });
}

/// The empty group's weight gradient is exactly zero on the device.
fn check_empty_group_grad(report: &mut Report, rng: &mut Rng, cuda: &Device, dtype: DType) {
    let sizes = [3usize, 0, 4];
    let x = Var::from_tensor(
        &rng.tensor(&[7, 33], 1.0)
            .to_dtype(dtype)
            .unwrap()
            .to_device(cuda)
            .unwrap(),
    )
    .unwrap();
    let w = Var::from_tensor(
        &rng.tensor(&[3, 17, 33], 1.0)
            .to_dtype(dtype)
            .unwrap()
            .to_device(cuda)
            .unwrap(),
    )
    .unwrap();
    let grads = moelab_kernels::grouped_matmul(x.as_tensor(), w.as_tensor(), &sizes)
        .and_then(|y| y.sum_all()?.backward());
    let label = "grouped_matmul empty-group dw == 0";
    match grads {
        Ok(grads) => {
            let dw1 = flat_f64(&grads.get(w.as_tensor()).unwrap().get(1).unwrap());
            let bad = dw1.iter().filter(|v| **v != 0.0).count();
            println!(
                "{label:<46} {:<5} bwd      {bad} non-zero of {}  {}",
                format!("{dtype:?}"),
                dw1.len(),
                if bad == 0 { "ok" } else { "FAIL" }
            );
            if bad != 0 {
                report
                    .failures
                    .push(format!("{label} {dtype:?}: {bad} non-zero"));
            }
        }
        Err(e) => report.error(label, dtype, "bwd", e),
    }
}

/// AdamW's composed update (the tensor ops the fused kernel replaces), as the optimizer's
/// fallback and the CPU test write it: returns the new (param, m, v).
fn composed_adamw(
    p: &Tensor,
    m: &Tensor,
    v: &Tensor,
    g: &Tensor,
    u: &moelab_kernels::AdamWUpdate,
) -> Result<[Tensor; 3]> {
    let g = (g * u.grad_scale)?;
    let m = ((m * u.beta1)? + (&g * (1.0 - u.beta1))?)?;
    let v = ((v * u.beta2)? + (g.sqr()? * (1.0 - u.beta2))?)?;
    let step = ((&m / u.correction1)? / ((&v / u.correction2)?.sqrt()? + u.eps)?)?;
    let p = ((p * (1.0 - u.decay))? - (step * u.lr)?)?;
    Ok([p, m, v])
}

/// (param, m, v) after the fused update on the device, the composed one on the device and the
/// composed one on the CPU.
type AdamWRuns = [[Tensor; 3]; 3];

/// Three AdamW steps of an `n`-element f32 parameter from zero moments, three ways.
fn adamw_runs(rng: &mut Rng, cuda: &Device, n: usize) -> Result<AdamWRuns> {
    let p0 = rng.tensor(&[n], 1.0);
    let zeros = Tensor::zeros(n, DType::F32, &Device::Cpu)?;
    let on_cuda = |t: &Tensor| t.to_device(cuda);
    let fused = [on_cuda(&p0)?, on_cuda(&zeros)?, on_cuda(&zeros)?];
    let mut device_ref = [on_cuda(&p0)?, on_cuda(&zeros)?, on_cuda(&zeros)?];
    let mut cpu_ref = [p0, zeros.clone(), zeros];
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
        let gd = g.to_device(cuda)?;
        let [p, m, v] = &fused;
        if !moelab_kernels::fused_adamw_supported(p, m, v, &gd) {
            candle_core::bail!("fused_adamw_supported is false for f32 CUDA tensors");
        }
        moelab_kernels::adamw_update(p, m, v, &gd, &u)?;
        let [p, m, v] = &device_ref;
        device_ref = composed_adamw(p, m, v, &gd, &u)?;
        let [p, m, v] = &cpu_ref;
        cpu_ref = composed_adamw(p, m, v, &g, &u)?;
    }
    Ok([fused, device_ref, cpu_ref])
}

/// The fused AdamW kernel over three steps against the composed update run on the same device
/// (bit for bit: the kernel rounds every operation as the composed ops do) and on the CPU.
fn check_adamw(report: &mut Report, rng: &mut Rng, cuda: &Device) {
    let label = "adamw_update f32 (50001,) x 3 steps";
    let [fused, device_ref, cpu_ref] = match adamw_runs(rng, cuda, 50_001) {
        Ok(runs) => runs,
        Err(e) => return report.error(label, DType::F32, "update", e),
    };
    for (i, what) in ["param", "m", "v"].iter().enumerate() {
        let got = flat_f64(&fused[i]);
        let diff = |want: &Tensor| {
            got.iter()
                .zip(flat_f64(want))
                .fold(0.0f64, |d, (a, b)| d.max((a - b).abs()))
        };
        let (on_device, on_cpu) = (diff(&device_ref[i]), diff(&cpu_ref[i]));
        let nans = got.iter().filter(|v| !v.is_finite()).count();
        let ok = nans == 0 && on_device == 0.0 && on_cpu == 0.0;
        println!(
            "{label:<46} F32   {what:<8} max|fused - composed| on device {on_device:.3e}, against CPU {on_cpu:.3e}  non-finite {nans}  {}",
            if ok { "ok" } else { "FAIL" }
        );
        if !ok {
            report.failures.push(format!(
                "{label} {what}: fused differs from the composed update by {on_device:e} (device) / {on_cpu:e} (CPU), {nans} non-finite"
            ));
        }
    }
}

/// The device sum of squares (the grad norm's terms) against an f64 sum of the same values;
/// 300001 elements: more than the first pass's 1024 blocks of 256 cover in one sweep.
fn check_sum_of_squares(report: &mut Report, rng: &mut Rng, cuda: &Device, dtype: DType) {
    let label = "sum_of_squares (300001,)";
    let x = rng.tensor(&[300_001], 2.0).to_dtype(dtype).unwrap();
    let want: f64 = flat_f64(&x).iter().map(|v| v * v).sum();
    let got = match moelab_kernels::sum_of_squares(&x.to_device(cuda).unwrap()) {
        Ok(moelab_kernels::SquareSum::Device(t)) if t.device().is_cuda() => {
            t.to_dtype(DType::F64).and_then(|t| t.to_scalar::<f64>())
        }
        Ok(other) => {
            return report.error(label, dtype, "fwd", format!("not on the device: {other:?}"))
        }
        Err(e) => return report.error(label, dtype, "fwd", e),
    };
    match got {
        Ok(got) => {
            // f32 accumulation of 3e5 positive terms, mostly pairwise: ~1e-6 relative at worst;
            // one dropped or doubled 256-element block moves the sum by ~1e-3.
            let err = (got - want).abs() / want;
            let ok = err < 1e-5;
            println!(
                "{label:<46} {:<5} fwd      rel_err {err:>10.3e}  tol 1e-5  {}",
                format!("{dtype:?}"),
                if ok { "ok" } else { "FAIL" }
            );
            if !ok {
                report.failures.push(format!(
                    "{label} {dtype:?}: {got} against {want} ({err:.3e})"
                ));
            }
        }
        Err(e) => report.error(label, dtype, "fwd", e),
    }
}

/// Router top-k on the device against the CPU choosing from the same (uploaded) scores, so
/// both see identical values: the ids and the histogram must be equal, ties included.
fn check_router_topk(report: &mut Report, rng: &mut Rng, cuda: &Device, dtype: DType) {
    // (tokens, experts, k, bias, scores rounded to quarters so that rows have ties)
    for (tokens, n_experts, k, with_bias, ties) in [
        (37usize, 64usize, 8usize, true, false),
        (300, 7, 2, false, true),
        (5, 300, 3, true, false),
    ] {
        let label = format!("router_topk ({tokens}, {n_experts}) k{k}");
        let mut scores = rng.tensor(&[tokens, n_experts], 1.0);
        if ties {
            scores = ((scores * 4.0).unwrap().round().unwrap() / 4.0).unwrap();
        }
        let scores = scores.to_dtype(dtype).unwrap();
        let bias = with_bias.then(|| rng.tensor(&[n_experts], 0.1));
        let run = |device: &Device| -> Result<(Vec<Vec<u32>>, Vec<u32>)> {
            let bias = match &bias {
                Some(b) => Some(b.to_device(device)?),
                None => None,
            };
            let top = moelab_kernels::router_topk(&scores.to_device(device)?, bias.as_ref(), k)?;
            Ok((
                top.expert_ids.to_device(&Device::Cpu)?.to_vec2::<u32>()?,
                top.counts.to_device(&Device::Cpu)?.to_vec1::<u32>()?,
            ))
        };
        let want = run(&Device::Cpu).unwrap();
        match run(cuda) {
            Ok(got) => {
                let bad_ids = got.0.iter().zip(&want.0).filter(|(a, b)| a != b).count();
                let ok = bad_ids == 0 && got.1 == want.1;
                println!(
                    "{label:<46} {:<5} fwd      {bad_ids} of {tokens} rows differ, counts {}  {}",
                    format!("{dtype:?}"),
                    if got.1 == want.1 { "equal" } else { "differ" },
                    if ok { "ok" } else { "FAIL" }
                );
                if !ok {
                    report.failures.push(format!(
                        "{label} {dtype:?}: {bad_ids} rows differ; counts {:?} against {:?}",
                        got.1, want.1
                    ));
                }
            }
            Err(e) => report.error(&label, dtype, "fwd", e),
        }
    }
}

/// The device dispatch plan as the model runs it on CUDA (router_topk's ids and histogram, then
/// `moe_plan::plan`) against the CPU's plan of the same scores: equal assignments, and permute /
/// un-permute through each routing give the same numbers (the routing index's rows and CSR).
fn check_moe_plan(report: &mut Report, rng: &mut Rng, cuda: &Device) {
    for (tokens, n_experts, k) in [(37usize, 6usize, 2usize), (300, 64, 8), (41, 4, 1)] {
        let label = format!("moe plan ({tokens}, {n_experts}) k{k}");
        let scores = rng.tensor(&[tokens, n_experts], 1.0);
        let run = |device: &Device| -> Result<(Vec<u32>, Vec<f32>, Vec<f32>)> {
            let top = moelab_kernels::router_topk(&scores.to_device(device)?, None, k)?;
            let counts: Vec<usize> = top
                .counts
                .to_vec1::<u32>()?
                .into_iter()
                .map(|c| c as usize)
                .collect();
            let plan = moelab_kernels::moe_plan::plan(&top.expert_ids, &counts)?;
            let x = Tensor::arange(0f32, (tokens * 3) as f32, device)?.reshape((tokens, 3))?;
            let rows = moelab_kernels::moe_dispatch::permute(&x, &plan.routing)?;
            let ones = Tensor::ones(tokens * k, DType::F32, device)?;
            let back = moelab_kernels::moe_dispatch::unpermute(&rows, &ones, &plan.routing)?;
            let host = |t: &Tensor| t.to_device(&Device::Cpu)?.flatten_all()?.to_vec1::<f32>();
            Ok((
                plan.assignment_of_row
                    .to_device(&Device::Cpu)?
                    .to_vec1::<u32>()?,
                host(&rows)?,
                host(&back)?,
            ))
        };
        let want = run(&Device::Cpu).unwrap();
        match run(cuda) {
            Ok(got) => {
                let ok = got == want;
                println!(
                    "{label:<46} U32   plan     assignments, permute and unpermute {}  {}",
                    if ok { "equal" } else { "differ" },
                    if ok { "ok" } else { "FAIL" }
                );
                if !ok {
                    report
                        .failures
                        .push(format!("{label}: the device plan differs from the CPU's"));
                }
            }
            Err(e) => report.error(&label, DType::U32, "plan", e),
        }
    }
}

/// An unsupported dtype is a clear error naming the op, not a crash.
fn check_f64_is_rejected(report: &mut Report, cuda: &Device) {
    let x = Tensor::zeros((2, 3), DType::F64, cuda).unwrap();
    match moelab_kernels::softmax_last_dim(&x) {
        Err(e) if e.to_string().contains("softmax") && e.to_string().contains("F64") => {
            println!(
                "{:<46} F64   fwd      clear error  ok",
                "softmax_last_dim unsupported dtype"
            );
        }
        other => report.failures.push(format!(
            "softmax_last_dim on f64 should be a clear error, got {:?}",
            other.map(|t| t.dims().to_vec())
        )),
    }
}

#[test]
fn cuda_ops_match_cpu_reference() {
    // Before any op runs: the flag is read once, on the first CUDA allocation.
    std::env::set_var("MOELAB_POISON_OUTPUTS", "1");
    let cuda = match Device::new_cuda(0) {
        Ok(d) => d,
        Err(e) => {
            println!("skipped: no CUDA device ({e})");
            return;
        }
    };
    let seed = match std::env::var("MOELAB_TEST_SEED") {
        Ok(s) => s
            .parse::<u64>()
            .expect("MOELAB_TEST_SEED must be an integer"),
        Err(_) => std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0),
    };
    println!("cuda_ops: seed {seed} (replay with MOELAB_TEST_SEED={seed})");
    let mut rng = Rng(SplitMix64::new(seed));
    let mut report = Report::default();
    let cases = cases(&mut rng);
    for dtype in [DType::F32, DType::BF16, DType::F16] {
        for case in &cases {
            run_case(&mut report, &mut rng, &cuda, dtype, case);
        }
        check_empty_group_grad(&mut report, &mut rng, &cuda, dtype);
        check_sum_of_squares(&mut report, &mut rng, &cuda, dtype);
        check_router_topk(&mut report, &mut rng, &cuda, dtype);
    }
    check_adamw(&mut report, &mut rng, &cuda);
    check_moe_plan(&mut report, &mut rng, &cuda);
    check_f64_is_rejected(&mut report, &cuda);
    cuda.synchronize().unwrap();
    assert!(
        report.failures.is_empty(),
        "seed {seed}: {} failures:\n{}",
        report.failures.len(),
        report.failures.join("\n")
    );
}
