//! The admin panel in a real browser (headless Chromium): signing in, creating an
//! instance, and linking it by QR code (read off a screenshot of the page) and by
//! pairing code, with wa-sim's phone on the other side.

mod common;

use std::time::{Duration, Instant};

use common::browser::{Browser, qr_codes_in};
use common::{ADMIN, Gateway, World};
use serde_json::json;

const PHONE: &str = "5511966660001";
const WAIT: Duration = Duration::from_secs(15);

/// Signs in with the admin token, typed into the form.
async fn sign_in(browser: &mut Browser, gw: &Gateway) {
    browser
        .open(&format!("{}/panel/sign-in", gw.api.base))
        .await;
    browser
        .eval("document.getElementById('token').focus()")
        .await;
    browser.type_text(ADMIN).await;
    browser.press("Enter", 0).await;
    browser
        .wait_for("location.pathname === '/panel'", WAIT)
        .await;
}

/// Opens the panel page of an instance made through the API.
async fn open_instance(browser: &mut Browser, gw: &Gateway, name: &str) -> common::Instance {
    let inst = gw.api.create_instance(name).await;
    browser
        .open(&format!("{}/panel/instances/{}", gw.api.base, inst.id))
        .await;
    browser
        .wait_for("document.body.dataset.state === 'noSession'", WAIT)
        .await;
    inst
}

/// Clicks a button by id.
async fn click(browser: &mut Browser, id: &str) {
    browser
        .eval(&format!("document.getElementById('{id}').click()"))
        .await;
}

/// The QR code the page shows, once it shows one other than `not`.
async fn shown_qr(browser: &mut Browser, not: &str) -> String {
    browser
        .wait_for(
            &format!(
                "(() => {{ const qr = document.getElementById('qr');
                   return !qr.hidden && qr.complete && qr.naturalWidth > 0
                     && qr.dataset.value !== '{not}' && qr.dataset.value; }})()"
            ),
            WAIT,
        )
        .await
        .as_str()
        .unwrap()
        .to_owned()
}

#[tokio::test]
async fn an_operator_signs_in_creates_an_instance_and_links_it_by_scanning_the_page() {
    let world = World::new().await;
    let gw = world.gateway().await;
    let mut browser = Browser::start().await;

    // Nothing of the panel without signing in: the address leads to the sign-in page.
    browser.open(&format!("{}/", gw.api.base)).await;
    browser
        .wait_for("location.pathname === '/panel/sign-in'", WAIT)
        .await;
    browser.keep_screenshot("sign-in.png").await;

    // A wrong token: a clear message, after a pause, and still signed out.
    browser
        .eval("document.getElementById('token').focus()")
        .await;
    browser.type_text("not-the-token").await;
    let typed = Instant::now();
    browser.press("Enter", 0).await;
    browser
        .wait_for(
            "document.body.innerText.includes('That is not the admin token.')",
            WAIT,
        )
        .await;
    assert!(typed.elapsed() >= Duration::from_millis(900));
    let listed = browser
        .eval("fetch('/panel/api/instances').then(r => r.status)")
        .await;
    assert_eq!(listed, json!(401));

    // The admin token: the instances page, with a session cookie scripts cannot read.
    sign_in(&mut browser, &gw).await;
    assert_eq!(browser.eval("document.cookie").await, json!(""));

    // Create an instance from the panel.
    browser
        .eval("document.getElementById('new-name').focus()")
        .await;
    browser.type_text("Front desk").await;
    browser.press("Enter", 0).await;
    browser
        .wait_for(
            "location.pathname.startsWith('/panel/instances/') && document.body.dataset.state === 'noSession'",
            WAIT,
        )
        .await;
    assert!(browser.text().await.contains("Front desk"));

    // Ask for a QR code: the one on the screen is the one wa-sim's phone accepts.
    click(&mut browser, "start").await;
    let value = shown_qr(&mut browser, "").await;
    let countdown = browser.text().await;
    assert!(
        countdown.contains("WhatsApp replaces this code in"),
        "{countdown}"
    );
    browser.keep_screenshot("instance-qr.png").await;
    let on_screen = qr_codes_in(&browser.screenshot().await);
    assert_eq!(on_screen, vec![value.clone()]);
    let (status, body) = world.wa.scan(&on_screen[0], Some(PHONE)).await.unwrap();
    assert_eq!(status, 200, "{body}");

    // The page says Connected within 2 s, without a reload, with the phone.
    let scanned = Instant::now();
    browser
        .wait_for(
            "document.body.dataset.state === 'connected'",
            Duration::from_secs(2),
        )
        .await;
    eprintln!(
        "the page showed Connected {:?} after the scan",
        scanned.elapsed()
    );
    browser
        .wait_for(
            &format!("document.getElementById('phone').textContent === '{PHONE}'"),
            WAIT,
        )
        .await;
    assert_eq!(
        browser
            .eval("document.getElementById('device').textContent")
            .await,
        json!(body["device"].to_string())
    );
    let since = browser
        .eval("document.getElementById('since').textContent")
        .await;
    assert!(since.as_str().unwrap().starts_with("20"), "{since}");
    browser.keep_screenshot("instance-connected.png").await;

    // The list shows it, with its phone and state.
    browser.open(&format!("{}/panel", gw.api.base)).await;
    browser
        .wait_for(
            "document.querySelector('#instances tbody tr')?.dataset.state === 'connected'",
            WAIT,
        )
        .await;
    let listed = browser.text().await;
    assert!(
        listed.contains("Front desk") && listed.contains(PHONE),
        "{listed}"
    );
    browser.keep_screenshot("instances.png").await;
}

#[tokio::test]
async fn new_codes_are_pushed_and_linking_stops_after_three_nobody_scanned() {
    let world = World::new().await;
    let gw = world.gateway().await;
    let mut browser = Browser::start().await;
    sign_in(&mut browser, &gw).await;
    open_instance(&mut browser, &gw, "Unscanned").await;

    click(&mut browser, "start").await;
    let mut seen = vec![shown_qr(&mut browser, "").await];
    // WhatsApp replaces the code twice: each new one is on the page at once.
    for _ in 0..2 {
        let (status, _) = world.wa.post("refresh-refs", json!({})).await.unwrap();
        assert_eq!(status, 200);
        let last = seen.last().unwrap().clone();
        seen.push(shown_qr(&mut browser, &last).await);
    }
    assert_eq!(world.stat("connections").await, 1);
    // A fourth: three went unscanned, so the page stops and the gateway closes the
    // window; wa-sim sees no connection from the instance any more.
    let (status, _) = world.wa.post("refresh-refs", json!({})).await.unwrap();
    assert_eq!(status, 200);
    browser
        .wait_for(
            "!document.getElementById('stopped').hidden && !document.getElementById('start').hidden
             && document.getElementById('qr').hidden",
            WAIT,
        )
        .await;
    assert_eq!(
        browser
            .eval("document.getElementById('start').textContent")
            .await,
        json!("Start again")
    );
    let deadline = tokio::time::Instant::now() + WAIT;
    while world.stat("connections").await != 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the window stayed open"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    browser.keep_screenshot("linking-stopped.png").await;

    // Starting again opens a new window with a new code.
    click(&mut browser, "start").await;
    let last = seen.last().unwrap().clone();
    shown_qr(&mut browser, &last).await;
}

#[tokio::test]
async fn a_number_links_by_pairing_code_from_the_panel() {
    let world = World::new().await;
    let gw = world.gateway().await;
    let mut browser = Browser::start().await;
    sign_in(&mut browser, &gw).await;
    open_instance(&mut browser, &gw, "By code").await;

    // The phone field is checked as the API checks it.
    browser
        .eval("document.getElementById('phone-input').focus()")
        .await;
    browser.type_text("12").await;
    browser.press("Enter", 0).await;
    browser
        .wait_for(
            "!document.getElementById('error').hidden && document.getElementById('error').textContent",
            WAIT,
        )
        .await;
    browser
        .eval("document.getElementById('phone-input').value = ''")
        .await;
    browser.type_text(PHONE).await;
    browser.press("Enter", 0).await;
    let shown = browser
        .wait_for(
            "!document.getElementById('code-box').hidden && document.getElementById('pair-code').textContent",
            WAIT,
        )
        .await;
    let shown = shown.as_str().unwrap();
    assert_eq!(shown.len(), 9, "{shown}");
    assert!(
        browser
            .text()
            .await
            .contains("Link with phone number instead")
    );
    browser.keep_screenshot("instance-pairing-code.png").await;

    let (status, body) = world.wa.link_code(PHONE, shown).await.unwrap();
    assert_eq!(status, 200, "{body}");
    browser
        .wait_for("document.body.dataset.state === 'connected'", WAIT)
        .await;
}

#[tokio::test]
async fn changes_need_the_panels_token_and_signing_out_ends_the_session() {
    let world = World::new().await;
    let gw = world.gateway().await;
    let mut browser = Browser::start().await;
    sign_in(&mut browser, &gw).await;

    // A request without the session's CSRF token changes nothing.
    let forged = browser
        .eval(
            "fetch('/panel/api/instances', { method: 'POST', headers: { 'content-type': 'application/json' },
               body: JSON.stringify({ name: 'forged' }) }).then(r => r.status)",
        )
        .await;
    assert_eq!(forged, json!(403));
    let (_, list) = gw
        .api
        .call(reqwest::Method::GET, "/instances", None, Some(ADMIN))
        .await;
    assert_eq!(list["total"], json!(0), "{list}");

    // Signing out: back to the sign-in page, and the session no longer works.
    browser
        .eval("document.querySelector('.sign-out button').click()")
        .await;
    browser
        .wait_for("location.pathname === '/panel/sign-in'", WAIT)
        .await;
    let listed = browser
        .eval("fetch('/panel/api/instances').then(r => r.status)")
        .await;
    assert_eq!(listed, json!(401));
    browser.open(&format!("{}/panel", gw.api.base)).await;
    browser
        .wait_for("location.pathname === '/panel/sign-in'", WAIT)
        .await;
}

/// Makes a link page through the partner route.
async fn link_page(
    gw: &Gateway,
    inst: &common::Instance,
    body: Option<serde_json::Value>,
) -> String {
    let path = format!("/instances/{}/token/{}/link-page", inst.id, inst.token);
    let (status, made) = gw
        .api
        .call(reqwest::Method::POST, &path, body, Some(ADMIN))
        .await;
    assert_eq!(status, 200, "{made}");
    let url = made["url"].as_str().unwrap().to_owned();
    assert!(url.starts_with(&format!("{}/link/", gw.api.base)), "{url}");
    url
}

#[tokio::test]
async fn the_number_s_owner_links_it_on_the_link_page_with_the_keyboard_alone() {
    let world = World::new().await;
    let gw = world.gateway().await;
    let inst = gw.api.create_instance("Acme Dental").await;
    // Making one is a partner route: the admin token is needed.
    let path = format!("/instances/{}/token/{}/link-page", inst.id, inst.token);
    let (status, _) = gw.api.call(reqwest::Method::POST, &path, None, None).await;
    assert_eq!(status, 401);
    let url = link_page(&gw, &inst, None).await;

    // A browser that never signed in: the page shows the business's name, and neither
    // the instance's id nor its token.
    let mut browser = Browser::start().await;
    browser.open(&url).await;
    browser
        .wait_for("document.body.dataset.state === 'noSession'", WAIT)
        .await;
    let page = browser.eval("document.documentElement.outerHTML").await;
    let page = page.as_str().unwrap();
    assert!(page.contains("Acme Dental"));
    assert!(!page.contains(&inst.id) && !page.contains(&inst.token));

    // Its event stream tells what linking needs, and nothing about the instance.
    let first = browser
        .eval(
            "new Promise(done => { const s = new EventSource(document.body.dataset.base + '/events');
               s.addEventListener('state', e => { s.close(); done(JSON.parse(e.data)); }); })",
        )
        .await;
    assert_eq!(
        first,
        json!({ "state": "noSession", "connected": false, "phone": null })
    );

    // Keyboard only: Tab reaches the button, Enter shows the code.
    browser.press("Tab", 0).await;
    assert_eq!(
        browser.eval("document.activeElement.id").await,
        json!("start")
    );
    browser.press("Enter", 0).await;
    let value = shown_qr(&mut browser, "").await;
    browser.keep_screenshot("link-page.png").await;
    assert_eq!(
        qr_codes_in(&browser.screenshot().await),
        vec![value.clone()]
    );

    // Or the phone-number path, still by keyboard: Tab to the field, type, Enter.
    browser.press("Tab", 0).await;
    assert_eq!(
        browser.eval("document.activeElement.id").await,
        json!("phone-input")
    );
    browser.type_text(PHONE).await;
    browser.press("Enter", 0).await;
    let code = browser
        .wait_for(
            "!document.getElementById('code-box').hidden && document.getElementById('pair-code').textContent",
            WAIT,
        )
        .await;
    let (status, body) = world
        .wa
        .link_code(PHONE, code.as_str().unwrap())
        .await
        .unwrap();
    assert_eq!(status, 200, "{body}");
    browser
        .wait_for("document.body.dataset.state === 'connected'", WAIT)
        .await;
    let text = browser.text().await;
    assert!(
        text.contains(PHONE) && text.contains("You can close this page"),
        "{text}"
    );
    assert_eq!(gw.api.status(&inst).await["connected"], json!(true));

    // The page did its job: opened again, it only says so, and links nothing more.
    browser.open(&url).await;
    let text = browser.text().await;
    assert!(text.contains("This link was used"), "{text}");
    let asked = browser
        .eval(&format!(
            "fetch('{url}/qr-code', {{ method: 'POST' }}).then(r => r.status)"
        ))
        .await;
    assert_eq!(asked, json!(410));
}

#[tokio::test]
async fn a_link_page_shows_another_s_window_only_once_asked_and_then_not_the_number() {
    let world = World::new().await;
    let gw = world.gateway().await;
    let inst = gw.api.create_instance("Two pages").await;
    let (first, second) = (
        link_page(&gw, &inst, None).await,
        link_page(&gw, &inst, None).await,
    );
    let mut browser = Browser::start().await;
    browser.open(&second).await;
    browser
        .wait_for("document.body.dataset.state === 'noSession'", WAIT)
        .await;
    // The first page's holder opens a window: the second page does not show its code.
    let opened = gw
        .api
        .http
        .post(format!("{first}/qr-code"))
        .send()
        .await
        .unwrap();
    assert_eq!(opened.status().as_u16(), 200);
    let value = opened.json::<serde_json::Value>().await.unwrap()["value"].clone();
    browser
        .wait_for("document.body.dataset.state === 'linking'", WAIT)
        .await;
    assert_eq!(
        browser.eval("document.getElementById('qr').hidden").await,
        json!(true)
    );
    // Asked on the second page, the window's code shows at once.
    click(&mut browser, "start").await;
    assert_eq!(json!(shown_qr(&mut browser, "").await), value);
    // Scanned: two pages were handed it, so neither names the number.
    let (status, body) = world
        .wa
        .scan(value.as_str().unwrap(), Some(PHONE))
        .await
        .unwrap();
    assert_eq!(status, 200, "{body}");
    browser
        .wait_for("document.body.dataset.state === 'connected'", WAIT)
        .await;
    let text = browser.text().await;
    assert!(text.contains("Linked. You can close this page."), "{text}");
    assert!(!text.contains(PHONE), "{text}");
}

#[tokio::test]
async fn expired_revoked_and_unknown_link_pages_say_so() {
    let world = World::new().await;
    let gw = world.gateway().await;
    let inst = gw.api.create_instance("Short-lived").await;
    let mut browser = Browser::start().await;

    let revoked = link_page(&gw, &inst, None).await;
    let path = format!("/instances/{}/token/{}/link-page", inst.id, inst.token);
    let (status, body) = gw
        .api
        .call(reqwest::Method::DELETE, &path, None, Some(ADMIN))
        .await;
    assert_eq!((status, &body["revoked"]), (200, &json!(1)), "{body}");

    let unknown = format!("{}/link/not-a-link-token", gw.api.base);
    for (url, status, says) in [
        (&revoked, 410, "This link was withdrawn"),
        (&unknown, 404, "This link is not valid"),
    ] {
        let answer = gw.api.http.get(url.as_str()).send().await.unwrap();
        assert_eq!(answer.status().as_u16(), status);
        browser.open(url).await;
        let text = browser.text().await;
        assert!(text.contains(says), "{url}: {text}");
        // Nothing on it can start linking either.
        let asked = browser
            .eval(&format!(
                "fetch('{}/qr-code', {{ method: 'POST' }}).then(r => r.status)",
                url
            ))
            .await;
        assert_eq!(asked, json!(status));
    }
    assert_eq!(world.stat("connections").await, 0);

    // One that runs out says it expired, and so does its open stream: it ends.
    let short = link_page(&gw, &inst, Some(json!({ "expiresIn": 2 }))).await;
    let token = short.rsplit('/').next().unwrap();
    let mut stream = gw
        .api
        .http
        .get(format!("{}/link/{token}/events", gw.api.base))
        .send()
        .await
        .unwrap();
    assert_eq!(stream.status().as_u16(), 200);
    tokio::time::timeout(Duration::from_secs(20), async {
        while let Ok(Some(_)) = stream.chunk().await {}
    })
    .await
    .expect("the stream of an expired link page ends");
    browser.open(&short).await;
    let text = browser.text().await;
    assert!(text.contains("This link has expired"), "{text}");
    browser.keep_screenshot("link-page-expired.png").await;

    // Bad lifetimes change nothing.
    for body in [
        json!({ "expiresIn": 0 }),
        json!({ "expiresIn": "soon" }),
        json!({ "other": 1 }),
    ] {
        let (status, answer) = gw
            .api
            .call(reqwest::Method::POST, &path, Some(body), Some(ADMIN))
            .await;
        assert_eq!(status, 400, "{answer}");
    }
}

#[tokio::test]
async fn the_list_follows_every_instance_live() {
    let world = World::new().await;
    let gw = world.gateway().await;
    let mut browser = Browser::start().await;
    sign_in(&mut browser, &gw).await;
    browser
        .wait_for("document.body.dataset.live === 'yes'", WAIT)
        .await;
    browser.eval("window.notReloaded = true").await;

    // An instance made elsewhere shows up, then its states as they change.
    let inst = gw.api.create_instance("Live").await;
    let row = format!(
        "[...document.querySelectorAll('#instances tbody tr')].find(r => r.dataset.id === '{}')",
        inst.id
    );
    browser
        .wait_for(&format!("{row}?.dataset.state === 'noSession'"), WAIT)
        .await;
    let (status, qr) = gw.api.qr_code(&inst).await;
    assert_eq!(status, 200, "{qr}");
    browser
        .wait_for(&format!("{row}?.dataset.state === 'linking'"), WAIT)
        .await;
    world.phone_scans(&qr, PHONE).await;
    browser
        .wait_for(
            &format!(
                "{row}?.dataset.state === 'connected' && {row}.cells[1].textContent === '{PHONE}'"
            ),
            WAIT,
        )
        .await;
    assert_eq!(browser.eval("window.notReloaded").await, json!(true));
}

#[tokio::test]
async fn the_demo_links_numbers_with_its_simulated_phone() {
    use tokio::io::AsyncBufReadExt as _;
    let dir = tempfile::tempdir().unwrap();
    let mut demo = tokio::process::Command::new(env!("CARGO_BIN_EXE_zapgate"))
        .args(["demo", "--listen", "127.0.0.1:0", "--data-dir"])
        .arg(dir.path())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("zapgate demo starts");
    let mut lines = tokio::io::BufReader::new(demo.stdout.take().unwrap()).lines();
    let (mut panel, mut token) = (None, None);
    while panel.is_none() || token.is_none() {
        let line = tokio::time::timeout(WAIT, lines.next_line())
            .await
            .expect("the demo prints its address and token")
            .unwrap()
            .expect("the demo keeps running");
        if let Some(url) = line.trim().strip_prefix("panel:") {
            panel = Some(url.trim().trim_end_matches('/').to_owned());
        } else if let Some(t) = line.trim().strip_prefix("admin token:") {
            token = Some(t.trim().to_owned());
        }
    }
    let (panel, token) = (panel.unwrap(), token.unwrap());

    let mut browser = Browser::start().await;
    browser.open(&format!("{panel}/")).await;
    browser
        .eval("document.getElementById('token').focus()")
        .await;
    browser.type_text(&token).await;
    browser.press("Enter", 0).await;
    browser
        .wait_for("location.pathname === '/panel'", WAIT)
        .await;
    for (name, by_code) in [("Demo by QR", false), ("Demo by code", true)] {
        browser.open(&format!("{panel}/panel")).await;
        browser
            .eval("document.getElementById('new-name').focus()")
            .await;
        browser.type_text(name).await;
        browser.press("Enter", 0).await;
        browser
            .wait_for("document.body.dataset.state === 'noSession'", WAIT)
            .await;
        if by_code {
            browser
                .eval("document.getElementById('phone-input').focus()")
                .await;
            browser.type_text(PHONE).await;
            browser.press("Enter", 0).await;
            browser
                .wait_for("!document.getElementById('code-box').hidden", WAIT)
                .await;
            click(&mut browser, "sim-code").await;
        } else {
            click(&mut browser, "start").await;
            shown_qr(&mut browser, "").await;
            browser
                .wait_for("!document.getElementById('sim-scan').hidden", WAIT)
                .await;
            click(&mut browser, "sim-scan").await;
        }
        browser
            .wait_for("document.body.dataset.state === 'connected'", WAIT)
            .await;
    }
    demo.kill().await.unwrap();
}

#[tokio::test]
async fn a_linked_number_is_managed_from_its_page_and_a_cancel_says_it_unlinks() {
    let world = World::new().await;
    let gw = world.gateway().await;
    let inst = world.linked_instance(&gw, "Managed", PHONE).await;
    let mut browser = Browser::start().await;
    sign_in(&mut browser, &gw).await;
    browser
        .open(&format!("{}/panel/instances/{}", gw.api.base, inst.id))
        .await;
    browser
        .wait_for("document.body.dataset.state === 'connected'", WAIT)
        .await;
    // Confirmations are answered yes, and what they said is kept.
    let confirm = "window.said = []; window.confirm = (m) => { window.said.push(m); return true; }";
    browser.eval(confirm).await;

    // Restart: the number reconnects.
    let logins = world.stat("logins").await;
    click(&mut browser, "restart").await;
    let deadline = tokio::time::Instant::now() + WAIT;
    while world.stat("logins").await == logins {
        assert!(
            tokio::time::Instant::now() < deadline,
            "no new login after Restart"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    browser
        .wait_for("document.body.dataset.state === 'connected'", WAIT)
        .await;

    // No link page while the number is linked: it would link another after a
    // disconnect.
    click(&mut browser, "make-link").await;
    let said = browser
        .wait_for("document.getElementById('error').textContent", WAIT)
        .await;
    assert_eq!(
        said,
        json!("This instance's number is linked: disconnect it before making a link page.")
    );

    // Disconnect, after a confirmation: the phone no longer lists the device.
    click(&mut browser, "disconnect").await;
    browser
        .wait_for("document.body.dataset.state === 'noSession'", WAIT)
        .await;
    let said = browser.eval("window.said[0]").await;
    assert!(said.as_str().unwrap().contains("unlinked"), "{said}");
    assert!(world.wa.devices().await.unwrap().is_empty());

    // Now a link page from the panel, opened on a phone-sized screen.
    click(&mut browser, "make-link").await;
    let url = browser
        .wait_for(
            "!document.getElementById('link-made').hidden && document.getElementById('link-url').href",
            WAIT,
        )
        .await;
    let url = url.as_str().unwrap().to_owned();
    assert!(url.starts_with(&format!("{}/link/", gw.api.base)), "{url}");
    let mut phone = Browser::start().await;
    phone
        .call(
            "Emulation.setDeviceMetricsOverride",
            json!({ "width": 390, "height": 844, "deviceScaleFactor": 2, "mobile": true }),
        )
        .await;
    phone.open(&url).await;
    phone
        .wait_for("document.body.dataset.state === 'noSession'", WAIT)
        .await;
    assert_eq!(
        phone
            .eval("document.documentElement.scrollWidth <= window.innerWidth")
            .await,
        json!(true),
        "nothing overflows a phone's screen"
    );

    // Cancel from the list: the confirmation says the number will be unlinked, then the
    // instance is gone.
    browser.open(&format!("{}/panel", gw.api.base)).await;
    browser.eval(confirm).await;
    browser
        .wait_for(
            "document.querySelector('#instances tbody tr button.danger')",
            WAIT,
        )
        .await;
    browser
        .eval("document.querySelector('#instances tbody tr button.danger').click()")
        .await;
    browser
        .wait_for(
            "document.querySelectorAll('#instances tbody tr').length === 0",
            WAIT,
        )
        .await;
    let said = browser.eval("window.said[0]").await;
    let said = said.as_str().unwrap();
    assert!(
        said.contains("Managed") && said.contains("will be unlinked"),
        "{said}"
    );
    let status = format!("/instances/{}/token/{}/status", inst.id, inst.token);
    let (code, _) = gw.api.call(reqwest::Method::GET, &status, None, None).await;
    assert_eq!(code, 404);
}

#[tokio::test]
async fn a_pending_webhook_is_retried_from_the_panel() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicU16, AtomicUsize, Ordering};
    // A receiver that answers 503 until told otherwise, counting what it got.
    let status = Arc::new(AtomicU16::new(503));
    let got = Arc::new(AtomicUsize::new(0));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/hook", listener.local_addr().unwrap());
    let app = {
        let (status, got) = (status.clone(), got.clone());
        axum::Router::new().route(
            "/hook",
            axum::routing::post(move || {
                let (status, got) = (status.clone(), got.clone());
                async move {
                    got.fetch_add(1, Ordering::SeqCst);
                    axum::http::StatusCode::from_u16(status.load(Ordering::SeqCst)).unwrap()
                }
            }),
        )
    };
    tokio::spawn(async move { axum::serve(listener, app).await });

    let world = World::new().await;
    let gw = world
        .gateway_with(&[("ZAPGATE_WEBHOOK_ALLOW_PRIVATE", "true")])
        .await;
    let inst = gw.api.create_instance("Hooked").await;
    let (code, body) = gw
        .api
        .set_webhook(&inst, "update-webhook-connected", &url)
        .await;
    assert_eq!(code, 200, "{body}");
    world.wa_link(&gw, &inst, PHONE).await;
    let deadline = tokio::time::Instant::now() + WAIT;
    while got.load(Ordering::SeqCst) == 0 {
        assert!(tokio::time::Instant::now() < deadline, "never tried");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    let mut browser = Browser::start().await;
    sign_in(&mut browser, &gw).await;
    browser
        .open(&format!("{}/panel/instances/{}", gw.api.base, inst.id))
        .await;
    click(&mut browser, "show-deliveries").await;
    browser
        .wait_for(
            "document.querySelector('#deliveries tbody tr')?.dataset.status === 'pending'",
            WAIT,
        )
        .await;
    // The receiver is back: Retry now delivers it without waiting for the backoff.
    status.store(200, Ordering::SeqCst);
    browser
        .eval("document.querySelector('#deliveries tbody tr button').click()")
        .await;
    browser
        .wait_for(
            "document.querySelector('#deliveries tbody tr')?.dataset.status === 'delivered'",
            Duration::from_secs(5),
        )
        .await;
}

#[tokio::test]
async fn a_sign_in_outlives_a_restart_and_ends_when_the_admin_token_changes() {
    use reqwest::Method;
    let world = World::new().await;
    let gw = world.gateway().await;
    let session = common::PanelSession::sign_in(&gw.api.base, common::ADMIN).await;
    gw.stop().await;
    // Restarted: still signed in, the page's CSRF token still good.
    let gw = world.gateway().await;
    let (status, made) = session
        .call(
            Method::POST,
            &gw.api.base,
            "/panel/api/instances",
            Some(serde_json::json!({"name": "After a restart"})),
        )
        .await;
    assert_eq!(status, 200, "{made}");
    gw.stop().await;
    // A new admin token: every session opened with the old one is over.
    let gw = world
        .gateway_with(&[("ZAPGATE_ADMIN_TOKEN", "a-new-admin-token")])
        .await;
    let (status, _) = session
        .call(Method::GET, &gw.api.base, "/panel/api/instances", None)
        .await;
    assert_eq!(status, 401);
    let (status, _) = session.page(&gw.api.base, "/panel").await;
    assert_eq!(status, 303);
    let again = common::PanelSession::sign_in(&gw.api.base, "a-new-admin-token").await;
    let (status, list) = again
        .call(Method::GET, &gw.api.base, "/panel/api/instances", None)
        .await;
    assert_eq!(status, 200);
    assert_eq!(list["items"][0]["name"], "After a restart");
    gw.stop().await;
}
