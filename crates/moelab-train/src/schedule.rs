//! Learning-rate schedules: linear warm-up, then cosine, linear, constant or warmup-stable-decay.

use serde::{Deserialize, Serialize};

/// Shape of the learning rate after warm-up.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ScheduleKind {
    /// Cosine from the peak down to `min_lr_ratio x lr` at the last step.
    Cosine,
    /// Straight line from the peak down to `min_lr_ratio x lr` at the last step.
    Linear,
    /// The peak forever.
    Constant,
    /// Warmup-stable-decay: the peak until the last `decay_fraction` of steps, then linear decay.
    Wsd,
}

/// A learning-rate schedule over `total_steps` optimizer steps.
#[derive(Debug, Clone, PartialEq)]
pub struct Schedule {
    /// The shape after warm-up.
    pub kind: ScheduleKind,
    /// Peak learning rate.
    pub lr: f64,
    /// Final learning rate as a fraction of the peak.
    pub min_lr_ratio: f64,
    /// Steps of linear warm-up from lr / warmup_steps to lr.
    pub warmup_steps: u64,
    /// Steps in the run.
    pub total_steps: u64,
    /// WSD: fraction of total steps spent decaying.
    pub decay_fraction: f64,
}

impl Schedule {
    /// Learning rate of (0-based) optimizer step `step`.
    pub fn lr_at(&self, step: u64) -> f64 {
        if step < self.warmup_steps {
            return self.lr * (step + 1) as f64 / self.warmup_steps as f64;
        }
        let min = self.lr * self.min_lr_ratio;
        let decay_steps = self.total_steps.saturating_sub(self.warmup_steps).max(1);
        let progress = ((step - self.warmup_steps) as f64 / decay_steps as f64).min(1.0);
        match self.kind {
            ScheduleKind::Constant => self.lr,
            ScheduleKind::Linear => self.lr - (self.lr - min) * progress,
            ScheduleKind::Cosine => {
                min + 0.5 * (self.lr - min) * (1.0 + (std::f64::consts::PI * progress).cos())
            }
            ScheduleKind::Wsd => {
                let decay = ((self.total_steps as f64 * self.decay_fraction).round() as u64).max(1);
                let decay_start = self.total_steps.saturating_sub(decay);
                if step < decay_start {
                    self.lr
                } else {
                    let t = ((step - decay_start) as f64 / decay as f64).min(1.0);
                    self.lr - (self.lr - min) * t
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn schedule(kind: ScheduleKind) -> Schedule {
        Schedule {
            kind,
            lr: 1.0,
            min_lr_ratio: 0.1,
            warmup_steps: 10,
            total_steps: 110,
            decay_fraction: 0.2,
        }
    }

    #[test]
    fn warmup_then_each_shape() {
        let cos = schedule(ScheduleKind::Cosine);
        assert!((cos.lr_at(0) - 0.1).abs() < 1e-12);
        assert!((cos.lr_at(9) - 1.0).abs() < 1e-12);
        assert!((cos.lr_at(10) - 1.0).abs() < 1e-12);
        assert!(
            (cos.lr_at(60) - 0.55).abs() < 1e-12,
            "half-way is the mean of peak and floor"
        );
        assert!((cos.lr_at(110) - 0.1).abs() < 1e-12);
        let lin = schedule(ScheduleKind::Linear);
        assert!((lin.lr_at(60) - 0.55).abs() < 1e-12);
        assert!((lin.lr_at(35) - 0.775).abs() < 1e-12);
        assert_eq!(schedule(ScheduleKind::Constant).lr_at(100), 1.0);
        let wsd = schedule(ScheduleKind::Wsd);
        // decay = 22 steps starting at 88.
        assert_eq!(wsd.lr_at(87), 1.0);
        assert!((wsd.lr_at(99) - (1.0 - 0.9 * 11.0 / 22.0)).abs() < 1e-12);
        assert!((wsd.lr_at(110) - 0.1).abs() < 1e-12);
    }
}
