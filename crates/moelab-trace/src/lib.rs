//! Expert-activation traces and their analyses (specialisation, Jensen-Shannon divergence,
//! co-activation, saturation), plots and reports.
//!
//! Filled by the traces issue; it consumes the per-layer routing records the model returns.
