//! The request parser on honest requests cut anywhere and on arbitrary bytes.

use proptest::prelude::*;

use super::*;
use crate::store::wire::{put_bytes, MAGIC};

fn set(key: &str, value: &[u8]) -> Vec<u8> {
    let mut out = vec![Op::Set as u8];
    put_bytes(&mut out, key.as_bytes());
    put_bytes(&mut out, value);
    out
}

#[test]
fn whole_requests_parse_and_partial_ones_say_what_they_need() {
    let bytes = set("k", b"value");
    for cut in 0..bytes.len() {
        match parse(&bytes[..cut]).expect("valid so far") {
            Parsed::Incomplete { need } => assert!(need > cut && need <= bytes.len()),
            other => panic!("{other:?} from {cut} bytes"),
        }
    }
    assert_eq!(
        parse(&bytes).expect("whole"),
        Parsed::Request {
            request: Request::Set {
                key: "k".into(),
                value: b"value".to_vec()
            },
            used: bytes.len()
        }
    );
    let mut validate = vec![Op::Validate as u8];
    validate.extend_from_slice(&MAGIC.to_le_bytes());
    assert!(matches!(
        parse(&validate),
        Ok(Parsed::Request {
            request: Request::Validate { magic: MAGIC },
            used: 5
        })
    ));
}

#[test]
fn declared_lengths_past_the_limits_are_refused_before_their_bytes() {
    let mut huge_value = vec![Op::Set as u8];
    put_bytes(&mut huge_value, b"k");
    huge_value.extend_from_slice(&(MAX_VALUE_LEN + 1).to_le_bytes());
    assert!(matches!(
        parse(&huge_value),
        Err(WireError::TooLong { what: "value", .. })
    ));
    let mut huge_key = vec![Op::Get as u8];
    huge_key.extend_from_slice(&u64::MAX.to_le_bytes());
    assert!(matches!(
        parse(&huge_key),
        Err(WireError::TooLong { what: "key", .. })
    ));
    let mut many = vec![Op::MultiGet as u8];
    many.extend_from_slice(&(MAX_KEY_COUNT + 1).to_le_bytes());
    assert!(matches!(parse(&many), Err(WireError::TooMany { .. })));
    // Two values each within the limit are fine; a declared value within its limit is only
    // buffered as it comes.
    let mut big = vec![Op::Set as u8];
    put_bytes(&mut big, b"k");
    big.extend_from_slice(&MAX_VALUE_LEN.to_le_bytes());
    assert!(matches!(parse(&big), Ok(Parsed::Incomplete { .. })));
    assert_eq!(parse(&[200]), Err(WireError::UnknownOp(200)));
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2048))]

    /// Arbitrary bytes: no panic; a request is never longer than its bytes; `need` is always
    /// more than what is there and within the request limit.
    #[test]
    fn arbitrary_bytes_never_panic(data in proptest::collection::vec(any::<u8>(), 0..512)) {
        match parse(&data) {
            Ok(Parsed::Request { used, .. }) => prop_assert!(used <= data.len()),
            Ok(Parsed::Incomplete { need }) => {
                prop_assert!(need > data.len());
                prop_assert!(need as u64 <= MAX_REQUEST + 16);
            }
            Err(_) => {}
        }
    }

    /// A stream of honest requests cut anywhere parses to the same requests.
    #[test]
    fn honest_streams_cut_anywhere(
        values in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..64), 1..8),
        cut in 1usize..40,
    ) {
        let stream: Vec<u8> = values.iter().enumerate().flat_map(|(i, v)| set(&format!("k{i}"), v)).collect();
        let mut buffered = Vec::new();
        let mut got = Vec::new();
        for piece in stream.chunks(cut) {
            buffered.extend_from_slice(piece);
            while let Ok(Parsed::Request { request, used }) = parse(&buffered) {
                got.push(request);
                buffered.drain(..used);
            }
        }
        prop_assert!(buffered.is_empty());
        let expected: Vec<Request> = values.iter().enumerate().map(|(i, v)| Request::Set { key: format!("k{i}"), value: v.clone() }).collect();
        prop_assert_eq!(got, expected);
    }
}
