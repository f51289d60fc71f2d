//! All-reduce throughput of the MPI collective (`moelab_train::dist`, feature `mpi`) over the
//! message sizes a gradient bucket takes, as the trainer calls it (f32 sum, in place). Run
//! directly it starts itself under `mpirun -n 2`:
//!
//!   cargo bench -p moelab-benches --features mpi --bench allreduce
//!
//! Reports, per size, the median time of one all-reduce and the bus bandwidth as NCCL's tests
//! define it (2 (n-1)/n x bytes / time), so figures compare with nccl-tests' `busbw`.

use std::time::Instant;

use moelab_train::dist;

fn main() {
    if dist::launch_env().is_none() {
        let exe = std::env::current_exe().unwrap_or_default();
        let status = std::process::Command::new("mpirun")
            .args(["-n", "2", "--oversubscribe"])
            .arg(exe)
            .env("OMPI_ALLOW_RUN_AS_ROOT", "1")
            .env("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
            .status();
        std::process::exit(status.ok().and_then(|s| s.code()).unwrap_or(1));
    }
    let comm = match dist::launch() {
        Ok(comm) => comm,
        Err(e) => {
            eprintln!("{e}");
            std::process::exit(1);
        }
    };
    let world = comm.world_size() as f64;
    if comm.rank() == 0 {
        println!("ranks {world}: elements, bytes, median ms, algbw GB/s, busbw GB/s");
    }
    for elements in [1usize << 10, 1 << 14, 1 << 18, 1 << 20, 1 << 22] {
        let mut buffer = vec![1f32; elements];
        let repeats = (64 * (1 << 20) / elements).clamp(5, 200);
        let mut times = Vec::with_capacity(repeats);
        for _ in 0..repeats + 2 {
            comm.barrier();
            let start = Instant::now();
            comm.all_reduce_f32(&mut buffer);
            times.push(start.elapsed().as_secs_f64());
        }
        // The first two warm the connection up.
        let mut times = times.split_off(2);
        times.sort_by(f64::total_cmp);
        let median = times[times.len() / 2];
        let bytes = (elements * 4) as f64;
        let algbw = bytes / median / 1e9;
        if comm.rank() == 0 {
            println!(
                "{elements:>9} {:>10} {:>9.3} {:>8.2} {:>8.2}",
                elements * 4,
                median * 1e3,
                algbw,
                algbw * 2.0 * (world - 1.0) / world
            );
        }
    }
}
