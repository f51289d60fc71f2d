//! Checked u64 arithmetic for the accounting (`ModelInfo`, `MemoryEstimate`): a count that
//! overflows stays overflowed through every later operation and becomes an error naming what
//! was being counted, instead of a wrapped number (release) or a panic (debug).

use std::iter::Sum;
use std::ops::{Add, Div, Mul, Sub};

use crate::ModelError;

/// A u64 count, or `None` once any step of its computation overflowed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Count(Option<u64>);

impl Count {
    /// Zero.
    pub(crate) const ZERO: Count = Count(Some(0));

    /// A config size as a count.
    pub(crate) fn of(x: usize) -> Self {
        Count(u64::try_from(x).ok())
    }

    /// The value, or an error saying that `what` does not fit in 64 bits.
    pub(crate) fn value(self, what: &str) -> Result<u64, ModelError> {
        self.0.ok_or_else(|| ModelError::Config {
            key: "model".into(),
            reason: format!(
                "{what} overflows 64 bits: the sizes in [model] (and the batch shape) are far beyond \
                 what any machine holds; check them for a typo"
            ),
        })
    }
}

impl From<u64> for Count {
    fn from(x: u64) -> Self {
        Count(Some(x))
    }
}

/// `Count op Count`, `Count op u64` and `u64 op Count` for a checked u64 method.
macro_rules! checked_op {
    ($trait:ident, $method:ident, $checked:ident) => {
        impl $trait for Count {
            type Output = Count;
            fn $method(self, rhs: Count) -> Count {
                Count(match (self.0, rhs.0) {
                    (Some(a), Some(b)) => a.$checked(b),
                    _ => None,
                })
            }
        }
        impl $trait<u64> for Count {
            type Output = Count;
            fn $method(self, rhs: u64) -> Count {
                self.$method(Count::from(rhs))
            }
        }
        impl $trait<Count> for u64 {
            type Output = Count;
            fn $method(self, rhs: Count) -> Count {
                Count::from(self).$method(rhs)
            }
        }
    };
}

checked_op!(Add, add, checked_add);
checked_op!(Sub, sub, checked_sub);
checked_op!(Mul, mul, checked_mul);
checked_op!(Div, div, checked_div);

impl Sum for Count {
    fn sum<I: Iterator<Item = Count>>(iter: I) -> Count {
        iter.fold(Count::ZERO, |a, b| a + b)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    #[test]
    fn overflow_sticks_and_is_named() {
        let big = Count::from(u64::MAX);
        assert_eq!((Count::of(3) * 4 + 1).value("x").unwrap(), 13);
        let wrapped = big * 2 + 1 - 5;
        let err = wrapped.value("total parameters").unwrap_err().to_string();
        assert!(err.contains("total parameters overflows 64 bits"), "{err}");
        assert!((Count::of(1) - Count::of(2)).value("x").is_err());
        assert_eq!(
            [Count::of(1), Count::of(2)].into_iter().sum::<Count>(),
            Count::from(3)
        );
    }
}
