//! The CUDA emulation's own tests (feature `cuda-emu`): each deliberately broken kernel of
//! tests/emu/broken_kernels.cu must be rejected with a message naming the bug and the kernel,
//! and its fixed form must run and give the right numbers. Also the execution model itself:
//! 1-3 D grids and blocks, every shuffle flavour, atomics, and the __half / __nv_bfloat16
//! conversions against the `half` crate's round-to-nearest-even.
#![cfg(feature = "cuda-emu")]
#![allow(clippy::unwrap_used, clippy::expect_used)]

use moelab_kernels::emu::{self, buf};

extern "C" {
    fn moelab_emu_broken_race(out: *mut f32);
    fn moelab_emu_ok_race(out: *mut f32);
    fn moelab_emu_broken_barrier(out: *mut f32, n: usize);
    fn moelab_emu_ok_barrier(out: *mut f32, n: usize);
    fn moelab_emu_broken_shared_bounds(out: *mut f32);
    fn moelab_emu_broken_dyn_bounds(out: *mut f32);
    fn moelab_emu_broken_shuffle(out: *mut f32);
    fn moelab_emu_ok_shuffle(out: *mut f32);
    fn moelab_emu_ok_shuffles(out: *mut f32);
    fn moelab_emu_broken_global_bounds(out: *mut f32, n: usize);
    fn moelab_emu_ok_dims(out: *mut u32);
}

#[derive(Clone, Copy)]
struct Out<T>(*mut T);

/// Runs `kernel` (one block of 64 threads, `shared` dynamic bytes) writing `len` floats.
fn run64(
    name: &str,
    len: usize,
    shared: u32,
    kernel: unsafe extern "C" fn(*mut f32),
) -> (Vec<f32>, candle_core::Result<()>) {
    let mut out = vec![f32::NAN; len];
    let p = Out(out.as_mut_ptr());
    let r = emu::launch(
        name,
        (1, 1, 1),
        (64, 1, 1),
        shared,
        &[buf("out", &out)],
        move || unsafe { kernel(p.0) },
    );
    (out, r)
}

fn expect_error(r: candle_core::Result<()>, kernel: &str, what: &[&str]) -> String {
    let msg = match r {
        Ok(()) => panic!("{kernel}: the emulation accepted a broken kernel"),
        Err(e) => e.to_string(),
    };
    assert!(
        msg.contains(kernel),
        "message does not name {kernel}: {msg}"
    );
    for w in what {
        assert!(msg.contains(w), "message does not say {w:?}: {msg}");
    }
    println!("{kernel}: {msg}");
    msg
}

#[test]
fn shared_memory_race_is_caught() {
    let (_, r) = run64("moelab_emu_broken_race", 64, 0, moelab_emu_broken_race);
    let msg = expect_error(
        r,
        "moelab_emu_broken_race",
        &[
            "shared-memory race",
            "__shared__ moelab_emu_broken_race::s byte 4",
        ],
    );
    // Thread 0 read s[1] before thread 1 wrote it: the word and both threads are named.
    assert!(msg.contains("(0,0,0)") && msg.contains("(1,0,0)"), "{msg}");
    let (out, r) = run64("moelab_emu_ok_race", 64, 0, moelab_emu_ok_race);
    r.unwrap();
    assert!(out
        .iter()
        .enumerate()
        .all(|(i, &v)| v == ((i + 1) % 64) as f32));
}

#[test]
fn skipped_barrier_is_a_deadlock() {
    let run = |name: &str, f: unsafe extern "C" fn(*mut f32, usize)| {
        let mut out = vec![f32::NAN; 64];
        let p = Out(out.as_mut_ptr());
        let r = emu::launch(
            name,
            (2, 1, 1),
            (64, 1, 1),
            0,
            &[buf("out", &out)],
            move || unsafe { f(p.0, 40) },
        );
        (out, r)
    };
    let (_, r) = run("moelab_emu_broken_barrier", moelab_emu_broken_barrier);
    expect_error(
        r,
        "moelab_emu_broken_barrier",
        &[
            "barrier deadlock",
            "block (0,0,0)",
            "40 threads wait",
            "24 have exited",
        ],
    );
    let (out, r) = run("moelab_emu_ok_barrier", moelab_emu_ok_barrier);
    r.unwrap();
    assert!(out[..40].iter().all(|&v| v == 1.0) && out[40..].iter().all(|v| v.is_nan()));
}

#[test]
fn one_past_a_shared_array_is_caught() {
    let (_, r) = run64(
        "moelab_emu_broken_shared_bounds",
        64,
        0,
        moelab_emu_broken_shared_bounds,
    );
    expect_error(
        r,
        "moelab_emu_broken_shared_bounds",
        &[
            "out of bounds",
            "index 64",
            "float [64]",
            "broken_kernels.cu",
            "thread (63,0,0)",
        ],
    );
    // Dynamic shared memory: 64 floats indexed, 32 launched.
    let (_, r) = run64(
        "moelab_emu_broken_dyn_bounds",
        64,
        128,
        moelab_emu_broken_dyn_bounds,
    );
    expect_error(
        r,
        "moelab_emu_broken_dyn_bounds",
        &[
            "shared-memory out of bounds",
            "moelab_emu_test_dyn",
            "past the launch's 128 bytes",
        ],
    );
    let (out, r) = run64(
        "moelab_emu_broken_dyn_bounds",
        64,
        256,
        moelab_emu_broken_dyn_bounds,
    );
    r.unwrap();
    assert!(out.iter().enumerate().all(|(i, &v)| v == (63 - i) as f32));
}

#[test]
fn shuffle_from_the_wrong_lane_is_caught() {
    let (_, r) = run64(
        "moelab_emu_broken_shuffle",
        64,
        0,
        moelab_emu_broken_shuffle,
    );
    expect_error(
        r,
        "moelab_emu_broken_shuffle",
        &[
            "shuffle reads the wrong lane",
            "reads lane 16",
            "mask 0x0000ffff",
        ],
    );
    let (out, r) = run64("moelab_emu_ok_shuffle", 64, 0, moelab_emu_ok_shuffle);
    r.unwrap();
    // Lane 0 of each warp holds the sum of its warp's lanes 0..16.
    assert_eq!(out[0], (0..16).sum::<i32>() as f32);
    assert_eq!(out[32], (32..48).sum::<i32>() as f32);
}

#[test]
fn shuffles_move_the_right_values() {
    let (out, r) = run64("moelab_emu_ok_shuffles", 4 * 64, 0, moelab_emu_ok_shuffles);
    r.unwrap();
    for t in 0..64usize {
        let (warp, lane) = (t / 32 * 32, t % 32);
        let down = if lane + 3 < 32 { t + 3 } else { t };
        let up = if lane >= 3 { t - 3 } else { t };
        let want = [warp + (lane ^ 5), down, up, warp + 7];
        let got: Vec<usize> = out[4 * t..4 * t + 4].iter().map(|&v| v as usize).collect();
        assert_eq!(got, want, "thread {t}");
    }
}

#[test]
fn global_out_of_bounds_is_caught() {
    let mut out = vec![0.0f32; 100];
    let p = Out(out.as_mut_ptr());
    let r = emu::launch(
        "moelab_emu_broken_global_bounds",
        (1, 1, 1),
        (128, 1, 1),
        0,
        &[buf("out", &out)],
        move || unsafe { moelab_emu_broken_global_bounds(p.0, 100) },
    );
    expect_error(
        r,
        "moelab_emu_broken_global_bounds",
        &[
            "global out of bounds",
            "thread (100,0,0)",
            "out (400 bytes), at byte offset 400",
        ],
    );
}

#[test]
fn grids_and_blocks_in_three_dimensions() {
    let (grid, block) = ((3u32, 2u32, 2u32), (4u32, 3u32, 2u32));
    let blocks = (grid.0 * grid.1 * grid.2) as usize;
    let threads = (block.0 * block.1 * block.2) as usize;
    let mut out = vec![u32::MAX; blocks * threads + 1];
    out[blocks * threads] = 0;
    let p = Out(out.as_mut_ptr());
    emu::launch(
        "moelab_emu_ok_dims",
        grid,
        block,
        0,
        &[buf("out", &out)],
        move || unsafe { moelab_emu_ok_dims(p.0) },
    )
    .unwrap();
    for b in 0..blocks {
        for t in 0..threads {
            assert_eq!(out[b * threads + t], (b * 10000 + t) as u32);
        }
    }
    assert_eq!(
        out[blocks * threads],
        (blocks * threads) as u32,
        "atomicAdd count"
    );
    // Launch limits as on the device.
    let r = emu::launch("moelab_emu_ok_dims", (1, 1, 1), (1025, 1, 1), 0, &[], || {});
    assert!(r.unwrap_err().to_string().contains("invalid block"));
    let r = emu::launch(
        "moelab_emu_ok_dims",
        (1, 70_000, 1),
        (32, 1, 1),
        0,
        &[],
        || {},
    );
    assert!(r.unwrap_err().to_string().contains("invalid grid"));
}

/// Every f32 bit pattern class the conversions meet: a sweep with a prime stride over all
/// 2^32 patterns, plus the edges (subnormal halfway points, the overflow threshold, NaN, inf).
fn sample_floats() -> Vec<f32> {
    let mut v: Vec<f32> = (0..(1u64 << 32))
        .step_by(65_521)
        .map(|b| f32::from_bits(b as u32))
        .collect();
    for bits in [
        0x477f_efffu32,
        0x477f_f000,
        0x477f_f001,
        0x3380_0000,
        0x3380_0001,
        0x3300_0000,
        0x3300_0001,
        0x387f_e000,
        0x387f_f000,
        0x7f80_0000,
        0x7fc0_0000,
        0xff80_0000,
        0x0000_0001,
        0x8000_0000,
    ] {
        v.push(f32::from_bits(bits));
    }
    // Exact ties: mantissas ending in the halfway pattern for f16 (13 bits) and bf16 (16 bits).
    for e in 100u32..150 {
        for m in [0x1000u32, 0x3000, 0x8000, 0x18000] {
            v.push(f32::from_bits((e << 23) | m));
        }
    }
    v
}

#[test]
fn half_conversions_round_to_nearest_even() {
    for f in sample_floats() {
        let want = half::f16::from_f32(f);
        let got = emu::f32_to_f16_bits(f);
        if f.is_nan() {
            assert!(half::f16::from_bits(got).is_nan(), "{f:e}");
        } else {
            assert_eq!(got, want.to_bits(), "f16 of {f:e} ({:#010x})", f.to_bits());
        }
        let want = half::bf16::from_f32(f);
        let got = emu::f32_to_bf16_bits(f);
        if f.is_nan() {
            assert!(half::bf16::from_bits(got).is_nan(), "{f:e}");
        } else {
            assert_eq!(got, want.to_bits(), "bf16 of {f:e} ({:#010x})", f.to_bits());
        }
    }
    for h in 0..=u16::MAX {
        let want = half::f16::from_bits(h).to_f32();
        let got = emu::f16_bits_to_f32(h);
        assert!(
            got.to_bits() == want.to_bits() || (got.is_nan() && want.is_nan()),
            "{h:#06x}"
        );
    }
}
