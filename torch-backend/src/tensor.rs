//! Buffers from the Python half's pointers, and the dtypes collectives carry.
//!
//! # Trust
//! An address and count describe a live tensor of the Python half's (which keeps it alive until
//! the op completes); they are still checked here for null, alignment and overflow, and a
//! buffer that overlaps another is copied rather than aliased.

use ferrun_collective::reduce::Element;

/// torch's names of the dtypes this backend reduces, in code order (the Python half sends the
/// index). Other dtypes move as bytes where no arithmetic is needed.
pub(crate) const DTYPE_NAMES: [&str; 9] = [
    "float32", "float64", "float16", "bfloat16", "int32", "int64", "uint8", "int8", "int16",
];

/// Runs `$body` with `$E` the element type of dtype code `$code` (an index of [`DTYPE_NAMES`]),
/// or evaluates `$bad` for an unknown code.
macro_rules! with_element {
    ($code:expr, $E:ident => $body:expr, else $bad:expr) => {
        match $code {
            0 => {
                type $E = f32;
                $body
            }
            1 => {
                type $E = f64;
                $body
            }
            2 => {
                type $E = ::half::f16;
                $body
            }
            3 => {
                type $E = ::half::bf16;
                $body
            }
            4 => {
                type $E = i32;
                $body
            }
            5 => {
                type $E = i64;
                $body
            }
            6 => {
                type $E = u8;
                $body
            }
            7 => {
                type $E = i8;
                $body
            }
            8 => {
                type $E = i16;
                $body
            }
            _ => $bad,
        }
    };
}
pub(crate) use with_element;

/// A tensor's memory: its address and its length in elements.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Raw {
    addr: usize,
    len: usize,
}

impl Raw {
    /// The buffer at `addr` of `len` elements of `E`, checked to be addressable.
    ///
    /// # Errors
    /// A null or misaligned address, or a length past the address space, named with `what`.
    pub(crate) fn new<E: Element>(what: &str, (addr, len): (usize, usize)) -> Result<Self, String> {
        let size = std::mem::size_of::<E>();
        if len == 0 {
            return Ok(Self { addr: 0, len: 0 });
        }
        if addr == 0 {
            return Err(format!("{what}: a tensor of {len} elements has no data"));
        }
        if addr % std::mem::align_of::<E>() != 0 {
            return Err(format!(
                "{what}: the tensor's data at {addr:#x} is not aligned to its {size}-byte elements (a view at an odd byte offset?); pass .clone()"
            ));
        }
        if len
            .checked_mul(size)
            .and_then(|b| addr.checked_add(b))
            .is_none_or(|end| end > isize::MAX as usize)
        {
            return Err(format!(
                "{what}: {len} elements at {addr:#x} overflow the address space"
            ));
        }
        Ok(Self { addr, len })
    }

    /// Elements.
    pub(crate) fn len(&self) -> usize {
        self.len
    }

    /// Whether the two buffers share any byte.
    pub(crate) fn overlaps<E>(&self, other: &Raw) -> bool {
        let size = std::mem::size_of::<E>();
        let (a, b) = (self.addr, other.addr);
        self.len > 0 && other.len > 0 && a < b + other.len * size && b < a + self.len * size
    }

    /// Where `self` starts inside `outer`, in elements, when it lies wholly inside it.
    pub(crate) fn offset_in<E>(&self, outer: &Raw) -> Option<usize> {
        let size = std::mem::size_of::<E>();
        let start = self.addr.checked_sub(outer.addr)?;
        (start % size == 0 && start / size + self.len <= outer.len).then_some(start / size)
    }

    /// The buffer as a slice.
    ///
    /// # Safety
    /// The memory must be a live allocation of `len` elements of `E` (the Python half holds the
    /// tensor), and no other slice over it may be alive while this one is.
    pub(crate) unsafe fn slice<'a, E: Element>(self) -> &'a mut [E] {
        if self.len == 0 {
            return &mut [];
        }
        // SAFETY: non-null, aligned and in bounds (checked by `new`); liveness and exclusivity
        // are the caller's.
        unsafe { std::slice::from_raw_parts_mut(self.addr as *mut E, self.len) }
    }
}
