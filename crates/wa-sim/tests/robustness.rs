//! Garbage on one socket closes that socket and nothing else.

mod common;

use std::time::Duration;

use common::Harness;
use futures_util::{SinkExt, StreamExt};
use serde_json::json;
use tokio_tungstenite::tungstenite::Message;
use wa_sim::Config;

const PHONE: &str = "5511999990002";

/// Sends `messages` on a fresh websocket and returns once the service has closed it.
async fn send_and_expect_close(url: &str, messages: Vec<Message>) {
    let (mut ws, _) = tokio_tungstenite::connect_async(url)
        .await
        .expect("websocket opens");
    for message in messages {
        // The service may already have closed after an earlier message.
        if ws.send(message).await.is_err() {
            return;
        }
    }
    let closed = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            match ws.next().await {
                None | Some(Err(_)) | Some(Ok(Message::Close(_))) => return,
                Some(Ok(_)) => {}
            }
        }
    })
    .await;
    assert!(closed.is_ok(), "the service kept a garbage connection open");
}

fn header_then(bytes: &[u8]) -> Message {
    let mut data = b"WA\x06\x03".to_vec();
    data.extend_from_slice(bytes);
    Message::Binary(data.into())
}

#[tokio::test]
async fn garbage_closes_only_the_connection_that_sent_it() {
    let h = Harness::with_config(Config {
        handshake_timeout: Duration::from_secs(1),
        ..Config::default()
    })
    .await;
    let mut companion = h.linked_companion(&h.store("g"), PHONE).await;
    let url = h.sim.ws_url();

    let cases: Vec<Vec<Message>> = vec![
        // Not WhatsApp at all.
        vec![Message::Binary(b"GET / HTTP/1.1\r\n\r\n".to_vec().into())],
        // A frame length far above the limit.
        vec![header_then(&[0xff, 0xff, 0xff, 1, 2, 3])],
        // A well-framed hello that is not a protobuf handshake message.
        vec![header_then(&[0, 0, 5, 0xde, 0xad, 0xbe, 0xef, 0x01])],
        // A hello whose ephemeral key is the wrong length.
        vec![header_then(&[0, 0, 6, 0x12, 0x04, 0x0a, 0x02, 0x01, 0x02])],
        // Text messages are not part of the protocol.
        vec![Message::Text("hello".into())],
        // A truncated frame, then silence: the handshake times out.
        vec![header_then(&[0, 1, 0, 1, 2, 3])],
        // Nothing at all.
        vec![],
    ];
    let count = cases.len() as u64;
    for messages in cases {
        send_and_expect_close(&url, messages).await;
    }

    let stats = h.control.stats().await.unwrap();
    assert_eq!(stats["protocolErrors"].as_u64(), Some(count), "{stats}");
    assert_eq!(
        stats["connections"],
        json!(1),
        "only the linked companion remains: {stats}"
    );
    let devices = h.control.devices().await.unwrap();
    assert_eq!(devices[0]["connected"], json!(true));
    assert!(companion.client.is_connected());
    let seen = companion.drain();
    assert!(!seen.iter().any(|e| e == "Disconnected"), "{seen:?}");

    // And it is still served: a 515 restart brings it straight back.
    let (status, _) = h
        .control
        .post("stream-error", json!({ "phone": PHONE, "code": 515 }))
        .await
        .unwrap();
    assert_eq!(status, 200);
    companion.wait_connected().await;
    companion.stop().await;
}
