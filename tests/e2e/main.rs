//! End-to-end tests: run the built `moelab` binary as a user would. One test binary (one link,
//! one process whose test threads run in parallel) with shared helpers, after ripgrep's layout:
//! `util` runs the binary and makes scratch folders, `corpus` writes inputs, and each other
//! module covers one area of the CLI.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod corpus;
mod fixture;
mod util;

mod ablate;
mod batches;
mod cli;
mod data;
#[cfg(feature = "mpi")]
mod distributed;
mod docs;
mod hf;
mod hostile;
mod mix;
mod refusals;
mod runs;
mod train;
