//! PostgreSQL's md5 password scheme: the stored hash and the salted challenge response.

use ::md5::{Digest, Md5};

/// Length of a stored or sent md5 hash: "md5" and 32 lowercase hex digits.
pub(crate) const MD5_LEN: usize = 35;

/// The md5 hash of `password` for `user` as PostgreSQL stores it in `pg_authid`:
/// `"md5" + hex(md5(password + user))`.
pub fn md5_hash(user: &str, password: &str) -> String {
    md5_hash_bytes(user, password.as_bytes())
}

/// [`md5_hash`] of a password that may not be UTF-8 (a cleartext PasswordMessage).
pub(crate) fn md5_hash_bytes(user: &str, password: &[u8]) -> String {
    let digest = Md5::new()
        .chain_update(password)
        .chain_update(user)
        .finalize();
    let mut out = String::with_capacity(MD5_LEN);
    out.push_str("md5");
    push_hex(&mut out, &digest);
    out
}

/// What a client answers to AuthenticationMD5Password with `salt`, given the stored hash's 32 hex
/// digits: `"md5" + hex(md5(stored_hex + salt))`.
pub fn md5_response(stored_hex: &str, salt: [u8; 4]) -> [u8; MD5_LEN] {
    let digest = Md5::new()
        .chain_update(stored_hex)
        .chain_update(salt)
        .finalize();
    let mut hex = String::with_capacity(MD5_LEN);
    hex.push_str("md5");
    push_hex(&mut hex, &digest);
    let mut out = [0u8; MD5_LEN];
    out.copy_from_slice(hex.as_bytes());
    out
}

fn push_hex(out: &mut String, bytes: &[u8]) {
    for &b in bytes {
        for nibble in [b >> 4, b & 0x0f] {
            out.push(char::from_digit(u32::from(nibble), 16).unwrap_or('0'));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hash_matches_postgres() {
        assert_eq!(
            md5_hash("postgres", "postgres"),
            "md53175bce1d3201d16594cebf9d7eb3f9d"
        );
        // CREATE ROLE dave PASSWORD 'postgres' with password_encryption = md5, PostgreSQL 15.
        assert_eq!(
            md5_hash("dave", "postgres"),
            "md5097507f116a094a52ebb62d68d3af19e"
        );
    }

    #[test]
    fn response_matches_libpq_formula() {
        // Expected values computed independently (Python hashlib).
        let got = md5_response("3175bce1d3201d16594cebf9d7eb3f9d", [1, 2, 3, 4]);
        assert_eq!(&got, b"md568be9ed08db75f318087ab337aaea044");
        let got = md5_response("097507f116a094a52ebb62d68d3af19e", [0xde, 0xad, 0xbe, 0xef]);
        assert_eq!(&got, b"md5d3530c141ced852884dae52ee9d30a35");
    }
}
