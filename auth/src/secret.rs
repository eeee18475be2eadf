//! Secrets as types: zeroized on drop, redacted in `Debug`, exposed only by name.

use zeroize::Zeroize;

/// A secret value. `Debug` prints `Secret(..)`; the bytes are wiped when dropped.
#[derive(Clone)]
pub struct Secret<T: Zeroize>(T);

impl<T: Zeroize> Secret<T> {
    pub fn new(value: T) -> Self {
        Secret(value)
    }

    /// The one way to read the secret; grep for it in review.
    pub fn expose(&self) -> &T {
        &self.0
    }
}

impl<T: Zeroize> Drop for Secret<T> {
    fn drop(&mut self) {
        self.0.zeroize();
    }
}

impl<T: Zeroize> std::fmt::Debug for Secret<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(..)")
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn debug_is_redacted() {
        let s = super::Secret::new(*b"hunter2hunter2hunter2hunter2abcd");
        assert_eq!(format!("{s:?}"), "Secret(..)");
    }
}
