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
    /// 8-bit signed integer.
    I8,
    /// 16-bit signed integer.
    I16,
}

impl DType {
    /// Every dtype, in code order: the order label codes on the wire and the torch backend's
    /// dtype codes use.
    pub const ALL: [DType; 9] = [
        Self::F32,
        Self::F64,
        Self::F16,
        Self::Bf16,
        Self::I32,
        Self::I64,
        Self::U8,
        Self::I8,
        Self::I16,
    ];

    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            Self::F64 | Self::I64 => 8,
            Self::F32 | Self::I32 => 4,
            Self::F16 | Self::Bf16 | Self::I16 => 2,
            Self::U8 | Self::I8 => 1,
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
element!(i8, I8, 0, |a, b| a.min(b), a.max(b), |x, n| (i64::from(x) / n as i64) as i8, sum: a.wrapping_add(b), prod: a.wrapping_mul(b));
element!(i16, I16, 0, |a, b| a.min(b), a.max(b), |x, n| (i64::from(x) / n as i64) as i16, sum: a.wrapping_add(b), prod: a.wrapping_mul(b));
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
    // One loop per operation, so that each is a tight (vectorizable) loop.
    fn each<T: Element>(acc: &mut [T], other: &[T], op: ReduceOp) {
        for (a, b) in acc.iter_mut().zip(other) {
            *a = T::combine(op, *a, *b);
        }
    }
    match op {
        ReduceOp::Sum | ReduceOp::Avg => each(acc, other, ReduceOp::Sum),
        ReduceOp::Prod => each(acc, other, ReduceOp::Prod),
        ReduceOp::Min => each(acc, other, ReduceOp::Min),
        ReduceOp::Max => each(acc, other, ReduceOp::Max),
    }
}

/// Combines elements arriving as little-endian bytes, in pieces cut anywhere (a piece may end
/// inside an element), into an accumulator: a receive reduces straight from the transport's
/// memory, with no copy into a buffer first.
#[derive(Debug)]
pub struct ByteFold<'a, T: Element> {
    op: ReduceOp,
    acc: &'a mut [T],
    /// Elements of `acc` combined so far.
    done: usize,
    /// The first bytes of an element cut between two pieces.
    carry: [u8; 8],
    carried: usize,
}

impl<'a, T: Element> ByteFold<'a, T> {
    /// A fold of `size_of_val(acc)` bytes into `acc`.
    pub fn new(op: ReduceOp, acc: &'a mut [T]) -> Self {
        Self {
            op,
            acc,
            done: 0,
            carry: [0; 8],
            carried: 0,
        }
    }

    /// Combines the next piece of bytes.
    ///
    /// # Panics
    /// If more bytes arrive than `acc` holds (the transports check lengths first).
    pub fn feed(&mut self, mut bytes: &[u8]) {
        let size = std::mem::size_of::<T>();
        if self.carried > 0 {
            let k = (size - self.carried).min(bytes.len());
            self.carry[self.carried..self.carried + k].copy_from_slice(&bytes[..k]);
            (self.carried, bytes) = (self.carried + k, &bytes[k..]);
            if self.carried < size {
                return;
            }
            let b = read_element::<T>(&self.carry[..size]);
            let a = &mut self.acc[self.done];
            *a = T::combine(self.op, *a, b);
            (self.done, self.carried) = (self.done + 1, 0);
        }
        let whole = bytes.len() / size;
        let acc = &mut self.acc[self.done..self.done + whole];
        combine_from_bytes(self.op, acc, &bytes[..whole * size]);
        self.done += whole;
        let rest = &bytes[whole * size..];
        self.carry[..rest.len()].copy_from_slice(rest);
        self.carried = rest.len();
    }
}

/// One element from its little-endian bytes, at any alignment.
#[allow(unsafe_code)]
fn read_element<T: Element>(bytes: &[u8]) -> T {
    assert!(bytes.len() >= std::mem::size_of::<T>());
    // SAFETY: in bounds (checked), unaligned read allowed; every bit pattern is a valid `T`
    // (plain data, see `bytes_of_mut`), and the bytes are little-endian as `T` is here.
    unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast::<T>()) }
}

/// `acc[i] = acc[i] ∘ element i of bytes`, the bytes at any alignment.
#[allow(unsafe_code)]
fn combine_from_bytes<T: Element>(op: ReduceOp, acc: &mut [T], bytes: &[u8]) {
    assert_eq!(std::mem::size_of_val(acc), bytes.len());
    // SAFETY: as `read_element`; `align_to` only views whole, aligned `T`s in the middle.
    let (head, middle, tail) = unsafe { bytes.align_to::<T>() };
    if head.is_empty() {
        combine_into(op, &mut acc[..middle.len()], middle);
        let size = std::mem::size_of::<T>();
        for (a, b) in acc[middle.len()..].iter_mut().zip(tail.chunks_exact(size)) {
            *a = T::combine(op, *a, read_element(b));
        }
        return;
    }
    fn each<T: Element>(acc: &mut [T], bytes: &[u8], op: ReduceOp) {
        let size = std::mem::size_of::<T>();
        for (a, b) in acc.iter_mut().zip(bytes.chunks_exact(size)) {
            *a = T::combine(op, *a, read_element(b));
        }
    }
    match op {
        ReduceOp::Sum | ReduceOp::Avg => each(acc, bytes, ReduceOp::Sum),
        ReduceOp::Prod => each(acc, bytes, ReduceOp::Prod),
        ReduceOp::Min => each(acc, bytes, ReduceOp::Min),
        ReduceOp::Max => each(acc, bytes, ReduceOp::Max),
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
    fn byte_folds_combine_pieces_cut_anywhere() {
        let theirs: Vec<f64> = (0..37).map(|i| f64::from(i) * 1.5 - 7.0).collect();
        let ours: Vec<f64> = (0..37).map(|i| f64::from(i * i)).collect();
        let mut want = ours.clone();
        combine_into(ReduceOp::Max, &mut want, &theirs);
        // Misaligned source bytes too: the ring hands out views at any offset.
        let mut wire = vec![0u8; 1];
        wire.extend_from_slice(bytes_of(&theirs));
        let wire = &wire[1..];
        for cuts in [
            vec![],
            vec![3],
            vec![8, 9, 10],
            vec![1, 2, 3, 4, 5, 6, 7, 100, 295],
        ] {
            let mut acc = ours.clone();
            let mut fold = ByteFold::new(ReduceOp::Max, &mut acc);
            let mut from = 0;
            for cut in cuts.into_iter().chain([wire.len()]) {
                fold.feed(&wire[from..cut]);
                from = cut;
            }
            assert_eq!(acc, want);
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
