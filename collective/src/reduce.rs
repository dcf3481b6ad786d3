//! Element types and reductions: what a collective may carry and how two buffers combine.
//!
//! # Guarantees
//! - Every reduction is commutative element by element (IEEE addition, multiplication, min and
//!   max are), so two ranks that combine the same pair of buffers in either order get the same
//!   bits; the algorithms rely on this for bitwise-identical results on every rank.
//! - `f16` and `bf16` are reduced in `f32` and rounded once per combination, as NCCL and Gloo do.
//! - `Avg` is a sum followed by one division by the world size ([`finish`]); for integers the
//!   division truncates.

use half::{bf16, f16};

/// The element types a collective carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DType {
    /// 32-bit float.
    F32,
    /// 64-bit float.
    F64,
    /// IEEE half precision.
    F16,
    /// bfloat16.
    Bf16,
    /// 32-bit signed integer.
    I32,
    /// 64-bit signed integer.
    I64,
    /// Byte.
    U8,
}

impl DType {
    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            Self::F64 | Self::I64 => 8,
            Self::F32 | Self::I32 => 4,
            Self::F16 | Self::Bf16 => 2,
            Self::U8 => 1,
        }
    }
}

/// How elements combine.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ReduceOp {
    /// Sum.
    Sum,
    /// Product.
    Prod,
    /// Minimum.
    Min,
    /// Maximum.
    Max,
    /// Mean over the ranks: a sum, then a division by the world size.
    Avg,
}

mod sealed {
    pub trait Sealed {}
}

/// An element type of a collective: plain data of a fixed size with the reductions.
pub trait Element:
    Copy + Send + Sync + PartialEq + std::fmt::Debug + 'static + sealed::Sealed
{
    /// The runtime tag of this type.
    const DTYPE: DType;
    /// The element's zero.
    const ZERO: Self;
    /// `a ∘ b` for a reduction (`Avg` combines as `Sum`).
    fn combine(op: ReduceOp, a: Self, b: Self) -> Self;
    /// `x / n`, for `Avg`.
    fn div(x: Self, n: usize) -> Self;
}

macro_rules! element {
    ($t:ty, $dtype:ident, $zero:expr, |$a:ident, $b:ident| $min:expr, $max:expr, |$x:ident, $n:ident| $div:expr,
     sum: $sum:expr, prod: $prod:expr) => {
        impl sealed::Sealed for $t {}
        impl Element for $t {
            const DTYPE: DType = DType::$dtype;
            const ZERO: Self = $zero;
            fn combine(op: ReduceOp, $a: Self, $b: Self) -> Self {
                match op {
                    ReduceOp::Sum | ReduceOp::Avg => $sum,
                    ReduceOp::Prod => $prod,
                    ReduceOp::Min => $min,
                    ReduceOp::Max => $max,
                }
            }
            fn div($x: Self, $n: usize) -> Self {
                $div
            }
        }
    };
}

/// Float min/max that is commutative to the bit: NaN wins (as in torch), and of two zeros `min`
/// takes -0.0 and `max` +0.0 (plain `f32::min` may return either).
macro_rules! float_extrema {
    ($min:ident, $max:ident, $t:ty) => {
        fn $min(a: $t, b: $t) -> $t {
            if a.is_nan() || b.is_nan() {
                <$t>::NAN
            } else if a < b || (a == b && a.is_sign_negative()) {
                a
            } else {
                b
            }
        }
        fn $max(a: $t, b: $t) -> $t {
            if a.is_nan() || b.is_nan() {
                <$t>::NAN
            } else if a > b || (a == b && a.is_sign_positive()) {
                a
            } else {
                b
            }
        }
    };
}
float_extrema!(min32, max32, f32);
float_extrema!(min64, max64, f64);

element!(f32, F32, 0.0, |a, b| min32(a, b), max32(a, b), |x, n| x / n as f32, sum: a + b, prod: a * b);
element!(f64, F64, 0.0, |a, b| min64(a, b), max64(a, b), |x, n| x / n as f64, sum: a + b, prod: a * b);
element!(i32, I32, 0, |a, b| a.min(b), a.max(b), |x, n| x / n as i32, sum: a.wrapping_add(b), prod: a.wrapping_mul(b));
element!(i64, I64, 0, |a, b| a.min(b), a.max(b), |x, n| x / n as i64, sum: a.wrapping_add(b), prod: a.wrapping_mul(b));
element!(u8, U8, 0, |a, b| a.min(b), a.max(b), |x, n| (x as usize / n) as u8, sum: a.wrapping_add(b), prod: a.wrapping_mul(b));
element!(f16, F16, f16::ZERO, |a, b| f16::from_f32(min32(a.to_f32(), b.to_f32())), f16::from_f32(max32(a.to_f32(), b.to_f32())),
         |x, n| f16::from_f32(x.to_f32() / n as f32),
         sum: f16::from_f32(a.to_f32() + b.to_f32()), prod: f16::from_f32(a.to_f32() * b.to_f32()));
element!(bf16, Bf16, bf16::ZERO, |a, b| bf16::from_f32(min32(a.to_f32(), b.to_f32())), bf16::from_f32(max32(a.to_f32(), b.to_f32())),
         |x, n| bf16::from_f32(x.to_f32() / n as f32),
         sum: bf16::from_f32(a.to_f32() + b.to_f32()), prod: bf16::from_f32(a.to_f32() * b.to_f32()));

/// `acc[i] = acc[i] ∘ other[i]` for every element.
///
/// # Panics
/// Never for equal lengths; the callers (the algorithms) guarantee them.
pub fn combine_into<T: Element>(op: ReduceOp, acc: &mut [T], other: &[T]) {
    debug_assert_eq!(acc.len(), other.len());
    for (a, b) in acc.iter_mut().zip(other) {
        *a = T::combine(op, *a, *b);
    }
}

/// The last step of a reduction over `world` ranks: the division of `Avg`; nothing otherwise.
pub fn finish<T: Element>(op: ReduceOp, buf: &mut [T], world: usize) {
    if op == ReduceOp::Avg && world > 1 {
        for x in buf {
            *x = T::div(*x, world);
        }
    }
}

#[cfg(not(target_endian = "little"))]
compile_error!("ferrun's wire format is the elements' little-endian bytes, viewed in place: build for a little-endian target");

/// The elements' bytes as they go on the wire, viewed in place (no copy).
#[allow(unsafe_code)]
pub fn bytes_of<T: Element>(items: &[T]) -> &[u8] {
    // SAFETY: every `Element` (sealed: f32, f64, f16, bf16, i32, i64, u8) is plain data with no
    // padding, so its memory is `size_of_val` initialized bytes; the view borrows `items`.
    unsafe { std::slice::from_raw_parts(items.as_ptr().cast::<u8>(), std::mem::size_of_val(items)) }
}

/// The elements' bytes, writable in place: a receive lands directly in the typed buffer.
#[allow(unsafe_code)]
pub fn bytes_of_mut<T: Element>(items: &mut [T]) -> &mut [u8] {
    // SAFETY: as `bytes_of`; moreover every bit pattern is a valid value of each `Element`
    // type, so any bytes written through the view leave valid elements.
    unsafe {
        std::slice::from_raw_parts_mut(
            items.as_mut_ptr().cast::<u8>(),
            std::mem::size_of_val(items),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reductions_per_type() {
        assert_eq!(f32::combine(ReduceOp::Sum, 1.5, 2.0), 3.5);
        assert_eq!(i64::combine(ReduceOp::Prod, -3, 4), -12);
        assert_eq!(u8::combine(ReduceOp::Min, 7, 3), 3);
        assert_eq!(i32::combine(ReduceOp::Max, -7, 3), 3);
        assert_eq!(
            f16::combine(ReduceOp::Sum, f16::from_f32(1.0), f16::from_f32(0.5)),
            f16::from_f32(1.5)
        );
        assert_eq!(
            bf16::combine(ReduceOp::Max, bf16::from_f32(-1.0), bf16::from_f32(2.0)),
            bf16::from_f32(2.0)
        );
        let mut avg = [6.0f64, 9.0];
        finish(ReduceOp::Avg, &mut avg, 3);
        assert_eq!(avg, [2.0, 3.0]);
        let mut ints = [7i32];
        finish(ReduceOp::Avg, &mut ints, 2);
        assert_eq!(ints, [3]);
    }

    #[test]
    fn combination_is_commutative_bit_for_bit() {
        let xs = [
            0.1f32,
            -3.7e-8,
            1e30,
            f32::MIN_POSITIVE,
            -0.0,
            0.0,
            f32::NAN,
            f32::INFINITY,
        ];
        for op in [ReduceOp::Sum, ReduceOp::Prod, ReduceOp::Min, ReduceOp::Max] {
            for a in xs {
                for b in xs {
                    assert_eq!(
                        f32::combine(op, a, b).to_bits(),
                        f32::combine(op, b, a).to_bits(),
                        "{op:?} {a} {b}"
                    );
                }
            }
        }
    }

    #[test]
    fn bytes_are_the_little_endian_wire_format_in_place() {
        let mut items = [1i32, -2, 300_000];
        assert_eq!(&bytes_of(&items)[..4], &[1, 0, 0, 0]);
        bytes_of_mut(&mut items)[4..8].copy_from_slice(&7i32.to_le_bytes());
        assert_eq!(items, [1, 7, 300_000]);
        let halves = [bf16::from_f32(1.25), bf16::from_f32(-8.0)];
        assert_eq!(bytes_of(&halves).len(), 4);
        assert_eq!(bytes_of(&halves)[..2], bf16::from_f32(1.25).to_le_bytes());
    }
}
