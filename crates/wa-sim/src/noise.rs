//! The responder side of WhatsApp's Noise handshakes (XX, IK and XXfallback) and the
//! transport cipher that follows them.
//!
//! XX: the client sends its ephemeral; we answer with ours, our static and the cert chain;
//! the client finishes with its static and the login or registration payload.
//! IK: a client that cached our static sends everything in one hello; we answer with an
//! ephemeral and the chain and no static. If its cached static is not ours (the service
//! was restarted with a new key) we answer XXfallback, which is XX reusing its ephemeral.

use buffa::Message as _;
use wacore::libsignal::protocol::KeyPair;
use wacore::noise::{NoiseCipher, NoiseHandshake};
use wacore_binary::consts::{
    NOISE_PATTERN_IK, NOISE_PATTERN_XX, NOISE_PATTERN_XXFALLBACK, WA_CONN_HEADER,
};
use waproto::whatsapp::{self as wa, HandshakeMessage};

use crate::certs::ServerIdentity;

#[derive(Debug, thiserror::Error)]
pub(crate) enum HandshakeError {
    #[error("handshake message is not a valid protobuf: {0}")]
    Decode(#[from] buffa::DecodeError),
    #[error("handshake message is missing {0}")]
    Missing(&'static str),
    #[error("{0} must be 32 bytes")]
    BadKey(&'static str),
    #[error("handshake crypto failed: {0}")]
    Crypto(String),
}

impl From<wacore::noise::NoiseError> for HandshakeError {
    fn from(e: wacore::noise::NoiseError) -> Self {
        Self::Crypto(e.to_string())
    }
}

impl From<wacore::noise::HandshakeError> for HandshakeError {
    fn from(e: wacore::noise::HandshakeError) -> Self {
        Self::Crypto(e.to_string())
    }
}

type Result<T> = std::result::Result<T, HandshakeError>;

/// A finished handshake: who the client is (its static key), what it asked for (the
/// decrypted `ClientPayload` bytes) and the ciphers for the rest of the connection.
pub(crate) struct Established {
    pub(crate) client_static: [u8; 32],
    pub(crate) payload: Vec<u8>,
    pub(crate) transport: Transport,
    pub(crate) pattern: Pattern,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Pattern {
    Xx,
    Ik,
    XxFallback,
}

/// What to do after answering the client's hello.
pub(crate) enum AfterHello {
    /// IK accepted: the connection is up.
    Done(Established),
    /// XX or XXfallback: wait for the client's finish message.
    AwaitFinish(PendingFinish),
}

pub(crate) struct PendingFinish {
    noise: NoiseHandshake,
    ephemeral: KeyPair,
    pattern: Pattern,
}

/// Answers a client hello. Returns the server hello to send and the next step.
pub(crate) fn respond_to_hello(
    identity: &ServerIdentity,
    hello_bytes: &[u8],
) -> Result<(Vec<u8>, AfterHello)> {
    let hello = HandshakeMessage::decode_from_slice(hello_bytes)?
        .client_hello
        .into_option()
        .ok_or(HandshakeError::Missing("client_hello"))?;
    let client_ephemeral = key_field(hello.ephemeral.as_deref(), "client ephemeral")?;
    match (hello.r#static, hello.payload) {
        (Some(encrypted_static), Some(encrypted_payload)) => {
            match respond_ik(
                identity,
                client_ephemeral,
                &encrypted_static,
                &encrypted_payload,
            )? {
                Some((reply, established)) => Ok((reply, AfterHello::Done(established))),
                None => respond_xx(identity, client_ephemeral, Pattern::XxFallback),
            }
        }
        _ => respond_xx(identity, client_ephemeral, Pattern::Xx),
    }
}

fn respond_xx(
    identity: &ServerIdentity,
    client_ephemeral: [u8; 32],
    pattern: Pattern,
) -> Result<(Vec<u8>, AfterHello)> {
    let name = match pattern {
        Pattern::XxFallback => NOISE_PATTERN_XXFALLBACK,
        _ => NOISE_PATTERN_XX,
    };
    let mut noise = NoiseHandshake::new(name, &WA_CONN_HEADER)?;
    noise.authenticate(&client_ephemeral);
    let ephemeral = KeyPair::generate(&mut rand::rng());
    noise.authenticate(ephemeral.public_key.public_key_bytes());
    noise.mix_shared_secret(ephemeral.private_key.serialize(), &client_ephemeral)?;
    let encrypted_static = noise.encrypt(&identity.static_public())?;
    noise.mix_shared_secret(
        identity.static_key.private_key.serialize(),
        &client_ephemeral,
    )?;
    let encrypted_chain = noise.encrypt(&identity.cert_chain)?;
    let reply = server_hello(
        ephemeral.public_key.public_key_bytes(),
        Some(encrypted_static),
        encrypted_chain,
    );
    Ok((
        reply,
        AfterHello::AwaitFinish(PendingFinish {
            noise,
            ephemeral,
            pattern,
        }),
    ))
}

impl PendingFinish {
    pub(crate) fn finish(mut self, finish_bytes: &[u8]) -> Result<Established> {
        let finish = HandshakeMessage::decode_from_slice(finish_bytes)?
            .client_finish
            .into_option()
            .ok_or(HandshakeError::Missing("client_finish"))?;
        let encrypted_static = finish
            .r#static
            .ok_or(HandshakeError::Missing("client static"))?;
        let client_static = key_field(
            Some(&self.noise.decrypt(&encrypted_static)?),
            "client static",
        )?;
        self.noise
            .mix_shared_secret(self.ephemeral.private_key.serialize(), &client_static)?;
        let encrypted_payload = finish.payload.ok_or(HandshakeError::Missing("payload"))?;
        let payload = self.noise.decrypt(&encrypted_payload)?;
        Ok(Established {
            client_static,
            payload,
            transport: Transport::from_handshake(self.noise)?,
            pattern: self.pattern,
        })
    }
}

/// IK responder. `Ok(None)` means the client encrypted to a static key that is not ours:
/// answer with XXfallback instead of failing the connection.
fn respond_ik(
    identity: &ServerIdentity,
    client_ephemeral: [u8; 32],
    encrypted_static: &[u8],
    encrypted_payload: &[u8],
) -> Result<Option<(Vec<u8>, Established)>> {
    let mut noise = NoiseHandshake::new(NOISE_PATTERN_IK, &WA_CONN_HEADER)?;
    noise.authenticate(&identity.static_public());
    noise.authenticate(&client_ephemeral);
    noise.mix_shared_secret(
        identity.static_key.private_key.serialize(),
        &client_ephemeral,
    )?;
    let Ok(client_static) = noise.decrypt(encrypted_static) else {
        return Ok(None);
    };
    let client_static = key_field(Some(&client_static), "client static")?;
    noise.mix_shared_secret(identity.static_key.private_key.serialize(), &client_static)?;
    let payload = noise.decrypt(encrypted_payload)?;

    let ephemeral = KeyPair::generate(&mut rand::rng());
    noise.authenticate(ephemeral.public_key.public_key_bytes());
    noise.mix_shared_secret(ephemeral.private_key.serialize(), &client_ephemeral)?;
    noise.mix_shared_secret(ephemeral.private_key.serialize(), &client_static)?;
    let encrypted_chain = noise.encrypt(&identity.cert_chain)?;
    let reply = server_hello(
        ephemeral.public_key.public_key_bytes(),
        None,
        encrypted_chain,
    );
    Ok(Some((
        reply,
        Established {
            client_static,
            payload,
            transport: Transport::from_handshake(noise)?,
            pattern: Pattern::Ik,
        },
    )))
}

fn server_hello(ephemeral: &[u8], encrypted_static: Option<Vec<u8>>, payload: Vec<u8>) -> Vec<u8> {
    HandshakeMessage {
        server_hello: buffa::MessageField::some(wa::handshake_message::ServerHello {
            ephemeral: Some(ephemeral.to_vec()),
            r#static: encrypted_static,
            payload: Some(payload),
            ..Default::default()
        }),
        ..Default::default()
    }
    .encode_to_vec()
}

fn key_field(bytes: Option<&[u8]>, name: &'static str) -> Result<[u8; 32]> {
    crate::key32(bytes.ok_or(HandshakeError::Missing(name))?).ok_or(HandshakeError::BadKey(name))
}

/// AES-256-GCM per frame, one counter per direction. Each direction's counter is a u32
/// that would wrap after 2^32 frames; the connection is closed long before that.
pub(crate) struct Transport {
    read: NoiseCipher,
    write: NoiseCipher,
    read_counter: u32,
    write_counter: u32,
}

impl Transport {
    fn from_handshake(noise: NoiseHandshake) -> Result<Self> {
        // finish() returns keys in the initiator's order: its write key is our read key.
        let (client_write, client_read) = noise.finish()?;
        Ok(Self {
            read: client_write,
            write: client_read,
            read_counter: 0,
            write_counter: 0,
        })
    }

    pub(crate) fn decrypt(&mut self, frame: &mut Vec<u8>) -> Result<()> {
        let counter = next(&mut self.read_counter)?;
        self.read
            .decrypt_in_place_with_counter(counter, frame)
            .map_err(HandshakeError::from)
    }

    pub(crate) fn encrypt(&mut self, plaintext: &mut Vec<u8>) -> Result<()> {
        let counter = next(&mut self.write_counter)?;
        self.write
            .encrypt_in_place_with_counter(counter, plaintext)
            .map_err(HandshakeError::from)
    }
}

fn next(counter: &mut u32) -> Result<u32> {
    let current = *counter;
    *counter = current
        .checked_add(1)
        .ok_or_else(|| HandshakeError::Crypto("frame counter exhausted".into()))?;
    Ok(current)
}
