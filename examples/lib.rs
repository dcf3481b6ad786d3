//! Runnable examples for ferrun. The Python workers live in `python/`; see the README.
