//! Whatever a path holds, the gateway answers with a JSON error it means, never a
//! panic or a 500: property tests over real HTTP against the real binary.

mod common;

use common::{Instance, World};
use proptest::prelude::*;
use proptest::test_runner::{Config, TestRunner};
use serde_json::json;

/// Every byte outside the unreserved set percent-encoded, so the segment reaches the
/// router exactly as generated.
fn encode(bytes: &[u8]) -> String {
    bytes
        .iter()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'~' => {
                (*b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// A segment a URL keeps as one segment ("." and ".." are path navigation).
fn segment() -> impl Strategy<Value = String> {
    any::<String>().prop_filter("a real segment", |s| !s.is_empty() && s != "." && s != "..")
}

#[test]
fn any_path_gets_a_json_answer_that_says_what_is_wrong() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let (world, gw, inst) = rt.block_on(async {
        let world = World::new().await;
        // Hundreds of unknown ids and tokens from one address: not held back here (the
        // limit on failed authentications has its own test).
        let gw = world
            .gateway_with(&[("ZAPGATE_AUTH_FAILURES_PER_MINUTE", "1000000")])
            .await;
        let inst = gw.api.create_instance("paths").await;
        (world, gw, inst)
    });
    let runner = || {
        TestRunner::new(Config {
            cases: 200,
            failure_persistence: None,
            ..Config::default()
        })
    };

    // Any phone segment that the rules refuse: 400 with the rule's own words.
    runner()
        .run(&segment(), |raw| {
            prop_assume!(zapgate::phone::normalize(&raw).is_err());
            let why = zapgate::phone::normalize(&raw).unwrap_err();
            let answer = rt.block_on(
                gw.api
                    .instance_get(&inst, &format!("phone-code/{}", encode(raw.as_bytes()))),
            );
            prop_assert_eq!(answer, (400, json!({ "error": why })));
            Ok(())
        })
        .unwrap();

    // Any id and token: the same 404 as an unknown instance.
    runner()
        .run(&(segment(), segment()), |(id, token)| {
            prop_assume!(id != inst.id);
            let who = Instance {
                id: encode(id.as_bytes()),
                token: encode(token.as_bytes()),
            };
            let answer = rt.block_on(gw.api.instance_get(&who, "status"));
            prop_assert_eq!(answer, (404, json!({ "error": "Instance not found" })));
            Ok(())
        })
        .unwrap();

    // Bytes that are not UTF-8: 400, said plainly.
    runner()
        .run(&proptest::collection::vec(any::<u8>(), 1..24), |bytes| {
            prop_assume!(std::str::from_utf8(&bytes).is_err());
            let answer = rt.block_on(
                gw.api
                    .instance_get(&inst, &format!("phone-code/{}", encode(&bytes))),
            );
            prop_assert_eq!(
                answer,
                (400, json!({ "error": "The path is not valid UTF-8" }))
            );
            Ok(())
        })
        .unwrap();

    rt.block_on(async {
        assert_eq!(
            world.stat("handshakes").await,
            0,
            "nothing reached WhatsApp"
        );
        gw.stop().await;
    });
}
