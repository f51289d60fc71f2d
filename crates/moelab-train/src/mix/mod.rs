//! Mixture search built into the ablation loop (after RegMix, Data Mixing Laws and Olmix):
//! `swarm` draws mixtures around a base into an ablation file, `runs` reads what the trained
//! swarm measured, `fit` fits each measure as a function of the mixture (log-linear and linear,
//! chosen by leave-one-out error), `propose` minimises an objective over the fitted laws under
//! the simplex, bounds, the repetition limit and a KL bound, and `report` writes mix_report.md
//! with its plots. docs/MIXTURES.md describes the method and its limits.

pub mod fit;
pub mod propose;
pub mod report;
pub mod runs;
pub mod swarm;

pub use fit::{fit_runs, FitReport, Law, LawKind, TargetFit};
pub use propose::{propose, Proposal, ProposeOptions};
pub use report::write_report;
pub use runs::{read_runs, SwarmRuns};
pub use swarm::{draw_swarm, write_swarm, DomainBudget, Swarm, SwarmOptions};
