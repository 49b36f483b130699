//! Tests of the SCRAM exchange: RFC 7677's example, postgres-protocol's client, bad input.

use postgres_protocol::authentication::sasl::{ChannelBinding, ScramSha256};

use super::*;
use crate::auth::{Credential, Secret};

const RFC_CLIENT_FIRST: &str = "n,,n=user,r=rOprNGfwEbeRWgbNEkqO";
const RFC_SERVER_NONCE: &str = "%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0";
const RFC_SERVER_FIRST: &str =
    "r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096";
const RFC_CLIENT_FINAL: &str = "c=biws,r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,\
                                p=dHzbZapWIk4jUhN+Ute9ytag9zjfMHgsqmmiz7AndVQ=";
const RFC_SERVER_FINAL: &str = "v=6rriTRBi23WpRR/wtup+mMhUZUn/dB5nLTJRsjl95G4=";

// From a PostgreSQL 15 pg_authid: CREATE ROLE alice PASSWORD 'secret'.
const ALICE: &str = "SCRAM-SHA-256$4096:ypwpmSYq3YBbgU+BP2cevA==$P/wOfVTKcD7c9C+eryFJHyIrenE7FRoMPZy9IIGNsn8=:TZYrCEEfysjx7nAFiPwbti60fQzI7F8K9Y1N6z8W3S8=";

fn rfc_salted_password() -> [u8; 32] {
    let salt = STANDARD.decode("W22ZaJ0SNY7soEsUEjb6gQ==").unwrap();
    pbkdf2::pbkdf2_hmac_array::<Sha256, 32>(b"pencil", &salt, 4096)
}

fn rfc_verifier() -> ScramVerifier {
    // Derived once: PBKDF2 is slow in debug builds and the tests make hundreds of exchanges.
    static VERIFIER: std::sync::OnceLock<ScramVerifier> = std::sync::OnceLock::new();
    VERIFIER
        .get_or_init(|| {
            let salt = STANDARD.decode("W22ZaJ0SNY7soEsUEjb6gQ==").unwrap();
            ScramVerifier::from_password("pencil", &salt, 4096)
        })
        .clone()
}

/// An RFC 7677 exchange that has answered the client-first-message.
fn rfc_exchange() -> ScramExchange {
    let mut ex = ScramExchange::with_server_nonce(rfc_verifier(), RFC_SERVER_NONCE.into(), false);
    ex.client_first(RFC_CLIENT_FIRST.as_bytes()).unwrap();
    ex
}

/// Runs a whole exchange with postgres-protocol's client; the client checks the server too.
fn login(ex: &mut ScramExchange, password: &str, binding: ChannelBinding) -> Result<(), AuthError> {
    let mut client = ScramSha256::new(password.as_bytes(), binding);
    let server_first = ex.client_first(client.message())?;
    client
        .update(&server_first)
        .expect("client accepts server-first");
    let server_final = ex.client_final(client.message())?;
    client
        .finish(&server_final)
        .expect("client verifies the server signature");
    Ok(())
}

#[test]
fn rfc_7677_example() {
    let mut ex = ScramExchange::with_server_nonce(rfc_verifier(), RFC_SERVER_NONCE.into(), false);
    let server_first = ex.client_first(RFC_CLIENT_FIRST.as_bytes()).unwrap();
    assert_eq!(server_first, RFC_SERVER_FIRST.as_bytes());
    let server_final = ex.client_final(RFC_CLIENT_FINAL.as_bytes()).unwrap();
    assert_eq!(server_final, RFC_SERVER_FINAL.as_bytes());
}

#[test]
fn client_final_extensions_are_ignored() {
    // The proof covers the extension, which is part of client-final-message-without-proof.
    let without_proof = "c=biws,r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,x=ext";
    let auth_message = format!("n=user,r=rOprNGfwEbeRWgbNEkqO,{RFC_SERVER_FIRST},{without_proof}");
    let client_key = hmac_sha256(&rfc_salted_password(), &[b"Client Key"]);
    let stored_key: [u8; 32] = Sha256::digest(client_key).into();
    let signature = hmac_sha256(&stored_key, &[auth_message.as_bytes()]);
    let proof: Vec<u8> = client_key
        .iter()
        .zip(signature)
        .map(|(k, s)| k ^ s)
        .collect();
    let client_final = format!("{without_proof},p={}", STANDARD.encode(proof));

    let server_final = rfc_exchange()
        .client_final(client_final.as_bytes())
        .unwrap();
    let expected = hmac_sha256(&rfc_verifier().server_key, &[auth_message.as_bytes()]);
    assert_eq!(
        server_final,
        format!("v={}", STANDARD.encode(expected)).into_bytes()
    );
}

#[test]
fn rfc_7677_wrong_proof() {
    let mut ex = rfc_exchange();
    let wrong = RFC_CLIENT_FINAL.replace("p=dHzb", "p=dHza");
    assert!(matches!(
        ex.client_final(wrong.as_bytes()),
        Err(AuthError::BadPassword)
    ));
}

#[test]
fn postgres_protocol_client_logs_in() {
    for binding in [ChannelBinding::unsupported, ChannelBinding::unrequested] {
        let mut ex = ScramExchange::new(rfc_verifier());
        login(&mut ex, "pencil", binding()).unwrap();

        let mut ex = ScramExchange::new(rfc_verifier());
        let err = login(&mut ex, "pencil!", binding()).unwrap_err();
        assert!(matches!(err, AuthError::BadPassword), "{err:?}");
    }
}

#[test]
fn postgres_verifier_logs_in() {
    let verifier = ScramVerifier::parse(ALICE).unwrap();
    login(
        &mut ScramExchange::new(verifier.clone()),
        "secret",
        ChannelBinding::unsupported(),
    )
    .unwrap();
    let err = login(
        &mut ScramExchange::new(verifier),
        "Secret",
        ChannelBinding::unsupported(),
    );
    assert!(matches!(err, Err(AuthError::BadPassword)));
}

#[test]
fn credential_from_plain_password_logs_in() {
    let cred = Credential::new("alice", Secret::Plain("hunter2".into()));
    let verifier = cred.scram().unwrap().clone();
    login(
        &mut ScramExchange::new(verifier),
        "hunter2",
        ChannelBinding::unsupported(),
    )
    .unwrap();

    // SASLprep: U+00AD (soft hyphen) maps to nothing, so "I\u{AD}X" and "IX" are one password.
    let cred = Credential::new("bob", Secret::Plain("I\u{AD}X".into()));
    let verifier = cred.scram().unwrap().clone();
    login(
        &mut ScramExchange::new(verifier),
        "IX",
        ChannelBinding::unsupported(),
    )
    .unwrap();
}

#[test]
fn server_nonces_differ() {
    let first = |ex: &mut ScramExchange| ex.client_first(RFC_CLIENT_FIRST.as_bytes()).unwrap();
    let a = first(&mut ScramExchange::new(rfc_verifier()));
    let b = first(&mut ScramExchange::new(rfc_verifier()));
    assert_ne!(a, b);
    let a = String::from_utf8(a).unwrap();
    let nonce = a
        .strip_prefix("r=rOprNGfwEbeRWgbNEkqO")
        .unwrap()
        .split(',')
        .next()
        .unwrap();
    assert_eq!(nonce.len(), 24);
    assert!(nonce.bytes().all(is_printable));
}

#[test]
fn mock_exchange_looks_real_and_always_fails() {
    let first = |ex: &mut ScramExchange| {
        let reply = ex.client_first(RFC_CLIENT_FIRST.as_bytes()).unwrap();
        let reply = String::from_utf8(reply).unwrap();
        let salt = reply
            .split(",s=")
            .nth(1)
            .unwrap()
            .split(',')
            .next()
            .unwrap()
            .to_owned();
        assert!(reply.ends_with(",i=4096"), "{reply}");
        assert_eq!(STANDARD.decode(&salt).unwrap().len(), 16);
        salt
    };
    // The same unknown user sees the same salt every time, like a real user would.
    assert_eq!(
        first(&mut ScramExchange::mock("ghost")),
        first(&mut ScramExchange::mock("ghost"))
    );

    // Whatever the password, the mock fails the way a wrong password does.
    for password in ["", "pencil", "ghost"] {
        let err = login(
            &mut ScramExchange::mock("ghost"),
            password,
            ChannelBinding::unsupported(),
        );
        assert!(matches!(err, Err(AuthError::BadPassword)), "{err:?}");
    }
    // Malformed messages are still malformed, as for a real user.
    let mut ex = ScramExchange::mock("ghost");
    assert!(matches!(
        ex.client_first(b"p=x,,n=,r=a"),
        Err(AuthError::Malformed(_))
    ));
}

fn assert_malformed(result: Result<Vec<u8>, AuthError>, input: &[u8]) {
    match result {
        Err(AuthError::Malformed(msg)) => assert!(!msg.is_empty()),
        other => panic!(
            "{:?}: expected Malformed, got {other:?}",
            String::from_utf8_lossy(input)
        ),
    }
}

#[test]
fn malformed_client_first() {
    let cases: &[&[u8]] = &[
        b"",
        b"n",
        b"n,",
        b"n,,",
        b"x,,n=,r=abc",
        b",,n=,r=abc",
        b"p=tls-server-end-point,,n=,r=abc",
        b"p,,n=,r=abc",
        b"n,a=bob,n=,r=abc",
        b"n,a=,n=,r=abc",
        b"n;,n=,r=abc",
        b"n,,m=ext,n=,r=abc",
        b"n,,r=abc",
        b"n,,n=",
        b"n,,n=user",
        b"n,,n=user,r=",
        b"n,,n=user,s=abc",
        b"n,,n=user,r=ab\x01c",
        b"n,,n=user,r=ab cd",
        b"n,,n=user,r=caf\xc3\xa9",
        b"n,,n=user,r=abc,",
        b"n,,n=user,r=abc,1=ext",
        b"n,,n=user,r=abc,x",
        b"n,,n=\xff\xfe,r=abc",
        b"\xff,,n=,r=abc",
    ];
    for &input in cases {
        let mut ex = ScramExchange::new(rfc_verifier());
        assert_malformed(ex.client_first(input), input);
        // After an error the exchange is over.
        assert_malformed(ex.client_first(RFC_CLIENT_FIRST.as_bytes()), b"retry");
    }
    // Extensions after the nonce are ignored, as PostgreSQL does.
    let mut ex = ScramExchange::new(rfc_verifier());
    ex.client_first(b"y,,n=whoever,r=abc,x=ext").unwrap();
}

#[test]
fn malformed_client_final() {
    let nonce = "rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0";
    let proof = "p=dHzbZapWIk4jUhN+Ute9ytag9zjfMHgsqmmiz7AndVQ=";
    let cases = [
        String::new(),
        "c=biws".into(),
        format!("c=biws,r={nonce}"),
        format!("c=biws,r={nonce},"),
        format!("c=biws,r={nonce},p="),
        format!("c=biws,r={nonce},p=!!!!"),
        format!("c=biws,r={nonce},p=dHzbZapWIk4jUhN+Ute9ytag9zjfMHgsqmmiz7AndQ=="),
        format!("c=biws,r={nonce},{proof},x=1"),
        format!("c=biws,r={nonce},{proof},{proof}"),
        format!("c=biws,r={nonce},1=x,{proof}"),
        format!("c=biws,r={nonce},x,{proof}"),
        format!("{proof},c=biws,r={nonce}"),
        format!("r={nonce},c=biws,{proof}"),
        // Channel binding that is not the GS2 header of client-first ("n,,").
        format!("c=eSws,r={nonce},{proof}"),
        format!("c=,r={nonce},{proof}"),
        format!("c=biws=,r={nonce},{proof}"),
        // Nonce that is not the one the server sent.
        format!("c=biws,r=rOprNGfwEbeRWgbNEkqO,{proof}"),
        format!("c=biws,r={nonce}x,{proof}"),
        format!("c=biws,r=,{proof}"),
    ];
    for input in &cases {
        let mut ex = rfc_exchange();
        assert_malformed(ex.client_final(input.as_bytes()), input.as_bytes());
        assert_malformed(ex.client_final(RFC_CLIENT_FINAL.as_bytes()), b"retry");
    }
    let mut ex = rfc_exchange();
    assert_malformed(ex.client_final(b"c=biws,r=\xff"), b"non-UTF-8");

    // The flag of client-first must be echoed: "y,," is "eSws".
    let mut ex = ScramExchange::new(rfc_verifier());
    ex.client_first(b"y,,n=,r=abc").unwrap();
    let input = format!(
        "c=biws,r=abc{},p={}",
        ex.server_nonce,
        STANDARD.encode([0u8; 32])
    );
    assert_malformed(ex.client_final(input.as_bytes()), b"y then n");
}

#[test]
fn calls_out_of_order() {
    let mut ex = ScramExchange::new(rfc_verifier());
    assert_malformed(ex.client_final(RFC_CLIENT_FINAL.as_bytes()), b"final first");

    let mut ex = rfc_exchange();
    assert_malformed(ex.client_first(RFC_CLIENT_FIRST.as_bytes()), b"first twice");

    let mut ex = rfc_exchange();
    ex.client_final(RFC_CLIENT_FINAL.as_bytes()).unwrap();
    assert_malformed(ex.client_final(RFC_CLIENT_FINAL.as_bytes()), b"final twice");
}

#[test]
fn truncated_and_corrupted_messages_never_panic() {
    for i in 0..RFC_CLIENT_FIRST.len() {
        let mut ex = ScramExchange::new(rfc_verifier());
        let _ = ex.client_first(&RFC_CLIENT_FIRST.as_bytes()[..i]);
        let mut corrupted = RFC_CLIENT_FIRST.as_bytes().to_vec();
        corrupted[i] ^= 0x80;
        let _ = ScramExchange::new(rfc_verifier()).client_first(&corrupted);
    }
    for i in 0..RFC_CLIENT_FINAL.len() {
        let _ = rfc_exchange().client_final(&RFC_CLIENT_FINAL.as_bytes()[..i]);
        for flip in [0x01, 0x80] {
            let mut corrupted = RFC_CLIENT_FINAL.as_bytes().to_vec();
            corrupted[i] ^= flip;
            assert!(rfc_exchange().client_final(&corrupted).is_err());
        }
    }
}
