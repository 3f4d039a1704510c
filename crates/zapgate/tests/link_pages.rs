//! Link pages under hostile holders: their own budget of codes, apart from the
//! operator's; a pause only of their own linking; the number shown only to the page
//! it linked through; no page made while linked; URLs from the configuration alone;
//! and no pairing code or number in the default log.

mod common;

use common::{ADMIN, Gateway, Instance, World};
use reqwest::Method;
use serde_json::{Value, json};

const PHONE: &str = "5511966660001";
const OTHER: &str = "5511966660002";

/// Makes a link page through the partner route: its status and body.
async fn make_link_page(gw: &Gateway, inst: &Instance) -> (u16, Value) {
    let path = format!("/instances/{}/token/{}/link-page", inst.id, inst.token);
    gw.api.call(Method::POST, &path, None, Some(ADMIN)).await
}

/// A new link page's URL.
async fn link_page(gw: &Gateway, inst: &Instance) -> String {
    let (status, made) = make_link_page(gw, inst).await;
    assert_eq!(status, 200, "{made}");
    made["url"].as_str().unwrap().to_owned()
}

/// POSTs to one of the page's routes: the status, `Retry-After` and the body.
async fn page_post(
    gw: &Gateway,
    page: &str,
    route: &str,
    body: Option<Value>,
) -> (u16, Option<String>, Value) {
    let mut request = gw.api.http.post(format!("{page}/{route}"));
    if let Some(body) = body {
        request = request.json(&body);
    }
    let response = request.send().await.unwrap();
    let status = response.status().as_u16();
    let retry = response
        .headers()
        .get("retry-after")
        .map(|v| v.to_str().unwrap().to_owned());
    (status, retry, response.json().await.unwrap())
}

/// The page's pairing code for `phone`, which must be given.
async fn page_phone_code(gw: &Gateway, page: &str, phone: &str) -> String {
    let (status, _, body) =
        page_post(gw, page, "phone-code", Some(json!({ "phone": phone }))).await;
    assert_eq!(status, 200, "{phone}: {body}");
    body["code"].as_str().unwrap().to_owned()
}

/// A number of the form the gateway accepts, `n` apart from the others.
fn number(n: u32) -> String {
    format!("55119777{n:05}")
}

#[tokio::test]
async fn a_link_page_asks_on_its_own_budget_and_never_starves_the_operator() {
    let world = World::new().await;
    let gw = world
        .gateway_with(&[("ZAPGATE_LINK_RATE_PER_MINUTE", "2")])
        .await;
    let inst = gw.api.create_instance("Budget").await;
    let page = link_page(&gw, &inst).await;

    // The page spends its minute's budget, then hears so in words meant for it.
    page_phone_code(&gw, &page, &number(1)).await;
    page_phone_code(&gw, &page, &number(2)).await;
    let (status, retry, body) = page_post(
        &gw,
        &page,
        "phone-code",
        Some(json!({ "phone": number(3) })),
    )
    .await;
    assert_eq!(status, 429, "{body}");
    let wait: u64 = retry.expect("Retry-After").parse().unwrap();
    assert!((1..=60).contains(&wait), "{wait}");
    assert_eq!(
        body,
        json!({ "error": format!("Too many requests from this link: try again in {wait} s.") })
    );

    // The operator's budget is untouched: a pairing code, and the QR code.
    let (status, body) = gw.api.phone_code(&inst, &number(4)).await;
    assert_eq!(status, 200, "{body}");
    let (status, body) = gw.api.qr_code(&inst).await;
    assert_eq!(status, 200, "{body}");
    // And so is another page's.
    let other = link_page(&gw, &inst).await;
    page_phone_code(&gw, &other, &number(5)).await;
}

#[tokio::test]
async fn a_link_page_stops_only_the_linking_it_started() {
    let world = World::new().await;
    let gw = world.gateway().await;
    let inst = gw.api.create_instance("Stops").await;
    let (first, second) = (link_page(&gw, &inst).await, link_page(&gw, &inst).await);
    let not_yours = json!({
        "error": "This linking was not started from this link, so it stays open."
    });

    // A page's window: another page cannot close it, the page itself can.
    let (status, _, qr) = page_post(&gw, &first, "qr-code", None).await;
    assert_eq!(status, 200, "{qr}");
    let handshakes = world.stat("handshakes").await;
    let (status, _, body) = page_post(&gw, &second, "stop-linking", None).await;
    assert_eq!((status, body), (409, not_yours.clone()));
    let (status, _, again) = page_post(&gw, &first, "qr-code", None).await;
    assert_eq!(
        (status, &again["value"]),
        (200, &qr["value"]),
        "the same window"
    );
    let (status, _, body) = page_post(&gw, &first, "stop-linking", None).await;
    assert_eq!((status, body), (200, json!({ "value": true })));

    // The operator's window stays open whatever a page says.
    let (status, qr) = gw.api.qr_code(&inst).await;
    assert_eq!(status, 200, "{qr}");
    let (status, _, body) = page_post(&gw, &first, "stop-linking", None).await;
    assert_eq!((status, body), (409, not_yours));
    assert_eq!(gw.api.qr_code(&inst).await, (200, qr));
    assert_eq!(
        world.stat("handshakes").await,
        handshakes + 1,
        "one window for the page, one for the operator"
    );
}

#[tokio::test]
async fn a_link_page_gives_at_most_ten_pairing_codes_over_its_life_even_across_restarts() {
    let world = World::new().await;
    let env = [("ZAPGATE_LINK_RATE_PER_MINUTE", "60")];
    let gw = world.gateway_with(&env).await;
    let inst = gw.api.create_instance("Ten codes").await;
    let page = link_page(&gw, &inst).await;
    let mut last = String::new();
    for n in 1..=10 {
        last = page_phone_code(&gw, &page, &number(n)).await;
    }
    let used_up = json!({
        "error": "This link has given all the pairing codes it may (10): link with the QR code instead, or ask whoever sent the link for a new one."
    });
    let eleventh = Some(json!({ "phone": number(11) }));
    let (status, retry, body) = page_post(&gw, &page, "phone-code", eleventh.clone()).await;
    assert_eq!((status, retry, &body), (429, None, &used_up));
    // The code it was given is still there, and so is the QR code.
    assert_eq!(page_phone_code(&gw, &page, &number(10)).await, last);
    let (status, _, body) = page_post(&gw, &page, "qr-code", None).await;
    assert_eq!(status, 200, "{body}");

    // A restart does not give it new ones, and WhatsApp hears nothing of the ask.
    let old_base = gw.api.base.clone();
    gw.stop().await;
    let gw = world.gateway_with(&env).await;
    let page = page.replacen(&old_base, &gw.api.base, 1);
    let requests = world.stat("codeRequests").await;
    let (status, retry, body) = page_post(&gw, &page, "phone-code", eleventh).await;
    assert_eq!((status, retry, &body), (429, None, &used_up));
    assert_eq!(world.stat("codeRequests").await, requests);
}

#[tokio::test]
async fn a_link_page_shows_only_the_number_linked_through_it() {
    let world = World::new().await;
    let gw = world.gateway().await;
    let inst = gw.api.create_instance("Private").await;
    let page = link_page(&gw, &inst).await;
    let mut events = gw.api.link_events(&page).await;
    assert_eq!(
        events.until("state").await.data,
        json!({ "state": "noSession", "connected": false, "phone": null })
    );

    // The operator links a number: the page hears it is linked, not which number.
    world.wa_link(&gw, &inst, PHONE).await;
    let linked = loop {
        let event = events.until("state").await;
        if event.data["connected"] == json!(true) {
            break event.data;
        }
    };
    assert_eq!(
        linked,
        json!({ "state": "connected", "connected": true, "phone": null })
    );

    // Through a page, that page sees the number; another page does not, nor the
    // codes of a window it did not ask in.
    let (status, body) = gw.api.disconnect(&inst).await;
    assert_eq!(status, 200, "{body}");
    let (through, watching) = (link_page(&gw, &inst).await, link_page(&gw, &inst).await);
    let mut through_events = gw.api.link_events(&through).await;
    let mut watching_events = gw.api.link_events(&watching).await;
    let code = page_phone_code(&gw, &through, OTHER).await;
    let (status, body) = world.wa.link_code(OTHER, &code).await.unwrap();
    assert_eq!(status, 200, "{body}");
    let seen = until_connected(&mut through_events).await;
    assert!(seen.contains(&"pairing-code".to_owned()), "{seen:?}");
    assert_eq!(seen.last().unwrap(), &format!("connected {OTHER}"));
    assert_eq!(
        until_connected(&mut watching_events).await,
        ["state noSession", "state linking", "connected null"]
    );
}

/// The names of the stream's events up to the first that says connected, and then
/// the phone that one shows.
async fn until_connected(events: &mut common::EventStream) -> Vec<String> {
    let mut seen = Vec::new();
    loop {
        let event = events.next().await;
        if event.data["connected"] == json!(true) {
            seen.push(format!(
                "connected {}",
                event.data["phone"].as_str().unwrap_or("null")
            ));
            return seen;
        }
        match event.name.as_str() {
            "state" => seen.push(format!("state {}", event.data["state"].as_str().unwrap())),
            name => seen.push(name.to_owned()),
        }
    }
}

#[tokio::test]
async fn a_window_two_pages_asked_in_shows_neither_the_number() {
    let world = World::new().await;
    let gw = world.gateway().await;
    let inst = gw.api.create_instance("Shared").await;
    let (first, second) = (link_page(&gw, &inst).await, link_page(&gw, &inst).await);
    let mut first_events = gw.api.link_events(&first).await;
    let mut second_events = gw.api.link_events(&second).await;
    let (status, _, qr) = page_post(&gw, &first, "qr-code", None).await;
    assert_eq!(status, 200, "{qr}");
    // The second page joins the window: it is handed the code as its event shows it.
    let (status, _, joined) = page_post(&gw, &second, "qr-code", None).await;
    assert_eq!((status, &joined["value"]), (200, &qr["value"]));
    assert!(
        joined["image"]
            .as_str()
            .unwrap()
            .starts_with("data:image/png;base64,")
    );
    assert!(joined["expiresIn"].as_u64().unwrap() > 0);
    world.phone_scans(&qr, PHONE).await;
    for events in [&mut first_events, &mut second_events] {
        let seen = until_connected(events).await;
        assert_eq!(seen.last().unwrap(), "connected null", "{seen:?}");
    }
}

#[tokio::test]
async fn no_link_page_is_made_while_the_number_is_linked() {
    let world = World::new().await;
    let gw = world.gateway().await;
    let inst = world.linked_instance(&gw, "Linked", PHONE).await;
    assert_eq!(
        make_link_page(&gw, &inst).await,
        (
            409,
            json!({ "error": "This instance's number is linked: disconnect it before making a link page." })
        )
    );

    // Once disconnected, a page links a number and is spent by it.
    let (status, body) = gw.api.disconnect(&inst).await;
    assert_eq!(status, 200, "{body}");
    let page = link_page(&gw, &inst).await;
    let (status, _, qr) = page_post(&gw, &page, "qr-code", None).await;
    assert_eq!(status, 200, "{qr}");
    world.phone_scans(&qr, OTHER).await;
    gw.api.wait_connected(&inst).await;
    let (status, _, _) = page_post(&gw, &page, "qr-code", None).await;
    assert_eq!(status, 410);
}

#[tokio::test]
async fn link_page_urls_come_from_the_configuration_never_from_the_request() {
    let world = World::new().await;
    let gw = world.gateway().await;
    let inst = gw.api.create_instance("Addressed").await;
    // A forged Host names the gateway's own address all the same.
    let answer = gw
        .api
        .http
        .post(format!(
            "{}/instances/{}/token/{}/link-page",
            gw.api.base, inst.id, inst.token
        ))
        .bearer_auth(ADMIN)
        .header("host", "evil.example/x?")
        .send()
        .await
        .unwrap();
    assert_eq!(answer.status().as_u16(), 200);
    let made: Value = answer.json().await.unwrap();
    let url = made["url"].as_str().unwrap();
    assert!(url.starts_with(&format!("{}/link/", gw.api.base)), "{url}");
    // Plain http: the panel's cookie is not marked Secure.
    assert!(
        !common::PanelSession::sign_in(&gw.api.base, ADMIN)
            .await
            .set_cookie
            .contains("Secure")
    );
    gw.stop().await;

    // Behind https, the URL says so, and so does the cookie.
    let gw = world
        .gateway_with(&[("ZAPGATE_PUBLIC_URL", "https://wa.example.com/")])
        .await;
    let url = link_page(&gw, &inst).await;
    assert!(url.starts_with("https://wa.example.com/link/"), "{url}");
    let cookie = common::PanelSession::sign_in(&gw.api.base, ADMIN)
        .await
        .set_cookie;
    assert!(cookie.ends_with("; Secure"), "{cookie}");
}

#[tokio::test]
async fn pairing_codes_and_numbers_stay_out_of_the_default_log() {
    let world = World::new().await;
    // The log filter the gateway has when RUST_LOG is not set.
    let gw =
        Gateway::start_without(&world.sim.ws_url(), &world.data_dir(), &[], &["RUST_LOG"]).await;
    let inst = gw.api.create_instance("Quiet").await;
    let page = link_page(&gw, &inst).await;
    let code = page_phone_code(&gw, &page, PHONE).await;
    let (status, body) = world.wa.link_code(PHONE, &code).await.unwrap();
    assert_eq!(status, 200, "{body}");
    gw.api.wait_connected(&inst).await;
    // Logged after the code was asked and typed: the lines before it are all in.
    gw.log.wait_for("number linked", 1).await;
    let log = gw.log.text();
    for secret in [PHONE, &code, &code.replace('-', "")] {
        assert!(!log.contains(secret), "{secret} is in the log:\n{log}");
    }
}
