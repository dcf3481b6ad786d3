//! The job's shared token: presented by every client as `authorization: Bearer <token>`,
//! compared in constant time by the service.

use tonic::metadata::MetadataValue;
use tonic::{Request, Status};

/// The environment variable that carries the token when `--rdzv-conf token=` does not.
pub const TOKEN_ENV: &str = "FERRUN_RDZV_TOKEN";

/// A job's token. Its `Debug` does not print it.
#[derive(Clone, PartialEq, Eq)]
pub struct Token(String);

impl std::fmt::Debug for Token {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Token(…)")
    }
}

impl Token {
    /// A token of 16 to 4096 visible ASCII characters (it travels in an HTTP/2 header).
    ///
    /// # Errors
    /// It is too short, too long, or has characters a header cannot carry.
    pub fn new(text: &str) -> Result<Self, String> {
        if !(16..=4096).contains(&text.len()) || !text.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(format!(
                "the rendezvous token must be 16 to 4096 visible ASCII characters (got {} bytes); e.g. `openssl rand -hex 32`",
                text.len()
            ));
        }
        Ok(Self(text.to_owned()))
    }

    /// The header value a client sends.
    pub fn header(&self) -> MetadataValue<tonic::metadata::Ascii> {
        // Visible ASCII always makes a valid header value.
        MetadataValue::try_from(format!("Bearer {}", self.0))
            .unwrap_or_else(|_| MetadataValue::from_static("Bearer"))
    }
}

/// The service's check of every call.
pub(super) fn check(
    token: Option<Token>,
) -> impl Fn(Request<()>) -> Result<Request<()>, Status> + Clone {
    let expected = token.map(|t| format!("Bearer {}", t.0).into_bytes());
    move |request: Request<()>| {
        let Some(expected) = &expected else {
            return Ok(request);
        };
        let given = request
            .metadata()
            .get("authorization")
            .map(|v| v.as_bytes())
            .unwrap_or_default();
        if equal_in_constant_time(given, expected) {
            Ok(request)
        } else {
            Err(Status::unauthenticated(
                "the rendezvous refused this node: it needs the job's token; give every node the same --rdzv-conf token=… or FERRUN_RDZV_TOKEN",
            ))
        }
    }
}

/// Equal contents, in time that depends only on the lengths.
fn equal_in_constant_time(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_checked_for_what_a_header_can_carry_and_never_printed() {
        assert!(Token::new("short").is_err());
        assert!(
            Token::new("sixteen chars ok").is_err(),
            "spaces cannot be in the header"
        );
        let token = Token::new("0123456789abcdef").unwrap();
        assert_eq!(format!("{token:?}"), "Token(…)");
        assert!(equal_in_constant_time(b"abc", b"abc"));
        assert!(!equal_in_constant_time(b"abc", b"abd"));
        assert!(!equal_in_constant_time(b"abc", b"abcd"));
    }
}
