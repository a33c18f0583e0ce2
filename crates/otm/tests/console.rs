//! The web console on the admin listener: what a browser sees (headless Chromium over
//! WebDriver) and what a client without a session or with a wrong token gets.

mod common;

use common::Harness;
use otm_testkit::text_update;
use serde_json::{Value, json};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A client that shows redirects instead of following them.
fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap()
}

fn console(h: &Harness, path: &str) -> String {
    format!("http://{}{path}", h.server().admin_addr)
}

fn form_body(fields: &[(&str, &str)]) -> String {
    fields
        .iter()
        .map(|(k, v)| {
            let enc: String = v
                .bytes()
                .map(|b| {
                    if b.is_ascii_alphanumeric() {
                        (b as char).to_string()
                    } else {
                        format!("%{b:02X}")
                    }
                })
                .collect();
            format!("{k}={enc}")
        })
        .collect::<Vec<_>>()
        .join("&")
}

/// The value of `name=` in a Set-Cookie header of `resp`.
fn set_cookie(resp: &reqwest::Response, name: &str) -> Option<String> {
    resp.headers()
        .get_all("set-cookie")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .find_map(|v| v.strip_prefix(&format!("{name}=")))
        .map(|v| v.split(';').next().unwrap_or("").to_owned())
}

/// The hidden CSRF field of the first form in `html`.
fn csrf_of(html: &str) -> String {
    let at = html.find("name=\"csrf\" value=\"").expect("a CSRF field") + 19;
    html[at..].split('"').next().unwrap().to_owned()
}

/// Signs in through the form with `token`; the answer to the post.
async fn sign_in(h: &Harness, token: &str) -> reqwest::Response {
    let http = client();
    let page = http.get(console(h, "/signin")).send().await.unwrap();
    assert_eq!(page.status(), 200);
    let pre = set_cookie(&page, "otm_console_signin").expect("the sign-in form's cookie");
    let html = page.text().await.unwrap();
    http.post(console(h, "/signin"))
        .header("content-type", "application/x-www-form-urlencoded")
        .header("cookie", format!("otm_console_signin={pre}"))
        .body(form_body(&[("csrf", &csrf_of(&html)), ("token", token)]))
        .send()
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_session_pages_go_to_sign_in_and_forms_are_refused() {
    let h = Harness::start().await;
    h.tenant("ada", "7101:ADA").await;
    let http = client();
    for path in [
        "/",
        "/?state=awake&sort=-inbox",
        "/fleet/rows",
        "/charts",
        "/charts/live",
        "/audit",
        "/tenants/ada",
        "/tenants/ada/live",
        "/tenants/ada/logs",
        "/tenants/nobody",
    ] {
        let resp = http.get(console(&h, path)).send().await.unwrap();
        assert_eq!(resp.status(), 303, "GET {path}");
        assert_eq!(resp.headers()["location"], "/signin", "GET {path}");
    }
    let posts = [
        "/tenants/ada/settings",
        "/tenants/ada/wake",
        "/tenants/ada/stop",
        "/tenants/ada/snapshots/000000000000001-abcd/restore",
        "/tenants/ada/inbox/1/retry",
        "/tenants/ada/inbox/1/drop",
        "/signout",
    ];
    for path in posts {
        let resp = http
            .post(console(&h, path))
            .header("content-type", "application/x-www-form-urlencoded")
            .body("csrf=anything&idle_timeout_s=5")
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 403, "POST {path}");
    }
    // A made-up session cookie is no session.
    let resp = http
        .get(console(&h, "/"))
        .header("cookie", "otm_console=0123456789abcdef")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 303);

    // The sign-in page itself carries the console's policy: scripts from here only.
    let page = http.get(console(&h, "/signin")).send().await.unwrap();
    let csp = page.headers()["content-security-policy"].to_str().unwrap();
    assert!(
        csp.contains("script-src 'self'") && !csp.contains("unsafe-inline"),
        "{csp}"
    );
    let html = page.text().await.unwrap();
    assert!(!html.contains("<script>"), "no inline script: {html}");

    // A wrong token is turned away; the right one gets a short-lived HttpOnly, SameSite=Strict
    // session.
    let wrong = sign_in(&h, "not-the-token").await;
    assert_eq!(wrong.status(), 401);
    assert!(set_cookie(&wrong, "otm_console").is_none());
    let right = sign_in(&h, &h.token).await;
    assert_eq!(right.status(), 303);
    let raw = right
        .headers()
        .get_all("set-cookie")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .find(|v| v.starts_with("otm_console="))
        .unwrap()
        .to_owned();
    assert!(
        raw.contains("HttpOnly") && raw.contains("SameSite=Strict") && raw.contains("Max-Age="),
        "{raw}"
    );
    let session = set_cookie(&right, "otm_console").unwrap();
    let cookie = format!("otm_console={session}");
    let fleet = http
        .get(console(&h, "/"))
        .header("cookie", &cookie)
        .send()
        .await
        .unwrap();
    assert_eq!(fleet.status(), 200);
    let html = fleet.text().await.unwrap();
    assert!(html.contains("data-tenant=\"ada\""), "{html}");
    let charts = http
        .get(console(&h, "/charts"))
        .header("cookie", &cookie)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        charts.contains("Wake latency by path and phase") && charts.contains("<svg"),
        "{charts}"
    );

    // Signed in, a form without its CSRF token is still refused, and changes nothing.
    for body in ["idle_timeout_s=5", "csrf=wrong&idle_timeout_s=5"] {
        let resp = http
            .post(console(&h, "/tenants/ada/settings"))
            .header("cookie", &cookie)
            .header("content-type", "application/x-www-form-urlencoded")
            .body(body)
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 403, "{body}");
    }
    let (_, t) = h.api(reqwest::Method::GET, "/tenants/ada", None).await;
    assert_ne!(t["idle_timeout_s"], 5, "{t}");
    // With it, the change is made through the admin API's own checks.
    let resp = http
        .post(console(&h, "/tenants/ada/settings"))
        .header("cookie", &cookie)
        .header("content-type", "application/x-www-form-urlencoded")
        .body(form_body(&[
            ("csrf", &csrf_of(&html)),
            ("idle_timeout_s", "5"),
        ]))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 303);
    let (_, t) = h.api(reqwest::Method::GET, "/tenants/ada", None).await;
    assert_eq!(t["idle_timeout_s"], 5, "{t}");
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_only_token_changes_nothing_and_a_wrong_token_shows_in_the_audit_trail() {
    let h = Harness::start().await;
    h.tenant("ada", "7301:ADA").await;
    let (status, created) = h
        .api(
            reqwest::Method::POST,
            "/tokens",
            Some(json!({"name": "dash", "read_only": true})),
        )
        .await;
    assert_eq!(status, 201, "{created}");
    let dash = created["token"].as_str().unwrap().to_owned();

    let wrong = sign_in(&h, "guess-the-token").await;
    assert_eq!(wrong.status(), 401);
    let signed = sign_in(&h, &dash).await;
    assert_eq!(signed.status(), 303, "a read-only token may look");
    let cookie = format!(
        "otm_console={}",
        set_cookie(&signed, "otm_console").unwrap()
    );
    let http = client();
    let html = http
        .get(console(&h, "/tenants/ada"))
        .header("cookie", &cookie)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(html.contains("dash"), "the page names who is signed in");
    let csrf = csrf_of(&html);
    for (path, body) in [
        (
            "/tenants/ada/settings",
            form_body(&[("csrf", &csrf), ("idle_timeout_s", "7")]),
        ),
        ("/tenants/ada/wake", form_body(&[("csrf", &csrf)])),
        ("/tenants/ada/stop", form_body(&[("csrf", &csrf)])),
        ("/tenants/ada/inbox/1/retry", form_body(&[("csrf", &csrf)])),
        ("/tenants/ada/inbox/1/drop", form_body(&[("csrf", &csrf)])),
    ] {
        let resp = http
            .post(console(&h, path))
            .header("cookie", &cookie)
            .header("content-type", "application/x-www-form-urlencoded")
            .body(body)
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 403, "POST {path} with a read-only token");
    }
    let (_, t) = h.api(reqwest::Method::GET, "/tenants/ada", None).await;
    assert_ne!(t["idle_timeout_s"], 7, "{t}");
    assert!(t["instance"].is_null(), "not woken: {t}");

    let (status, trail) = h.api(reqwest::Method::GET, "/audit", None).await;
    assert_eq!(status, 200, "{trail}");
    let entries = trail
        .as_array()
        .or_else(|| trail["entries"].as_array())
        .cloned()
        .unwrap_or_default();
    let has = |who: &str, route: &str, status: u64| {
        entries
            .iter()
            .any(|e| e["who"] == who && e["route"] == route && e["status"] == status)
    };
    assert!(
        has("unknown", "/signin", 401),
        "the wrong token's sign-in: {trail}"
    );
    assert!(
        has("dash", "/tenants/{id}/wake", 403),
        "the refused console write: {trail}"
    );
    // The console shows the trail too.
    let page = http
        .get(console(&h, "/audit"))
        .header("cookie", &cookie)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        page.contains("unknown") && page.contains("/signin"),
        "{page}"
    );
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_console_turns_it_off() {
    let h = Harness::start_with(|s| s.console = false).await;
    let resp = client().get(console(&h, "/signin")).send().await.unwrap();
    assert_eq!(resp.status(), 404);
    let (status, _) = h.api(reqwest::Method::GET, "/status", None).await;
    assert_eq!(status, 200, "the admin API stays");
    h.stop().await;
}

// ---------------------------------------------------------------------------------------------
// The browser.

/// A chromedriver process and one session of headless Chromium.
struct Browser {
    driver: Child,
    url: String,
    session: String,
    http: reqwest::Client,
}

const ELEMENT: &str = "element-6066-11e4-a52e-4f735466cecf";

fn which(name: &str) -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|p| {
        std::env::split_paths(&p)
            .map(|d| d.join(name))
            .find(|f| f.is_file())
    })
}

impl Browser {
    /// Starts chromedriver and a headless Chromium session, or `None` when they are not
    /// installed and this is no CI run.
    async fn start() -> Option<Browser> {
        let chromium = which("chromium").or_else(|| which("chromium-browser"));
        let driver = which("chromedriver");
        let (Some(chromium), Some(driver)) = (chromium, driver) else {
            if std::env::var_os("CI").is_some() {
                panic!(
                    "CI is set but chromium or chromedriver is missing: install Debian's chromium and chromium-driver (.ci/run does)"
                );
            }
            eprintln!(
                "SKIPPED: the console's browser test needs chromium and chromedriver (Debian: apt-get install chromium chromium-driver)"
            );
            return None;
        };
        let port = common::free_port();
        let child = Command::new(driver)
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("chromedriver starts");
        let url = format!("http://127.0.0.1:{port}");
        let http = reqwest::Client::builder().no_proxy().build().unwrap();
        let deadline = Instant::now() + Duration::from_secs(30);
        while http.get(format!("{url}/status")).send().await.is_err() {
            assert!(Instant::now() < deadline, "chromedriver did not answer");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let caps = json!({"capabilities": {"alwaysMatch": {
            "browserName": "chrome",
            "goog:chromeOptions": {
                "binary": chromium,
                "args": ["--headless=new", "--no-sandbox", "--disable-gpu",
                         "--disable-dev-shm-usage", "--window-size=1280,900"]
            },
            "goog:loggingPrefs": {"browser": "ALL"}
        }}});
        let mut b = Browser {
            driver: child,
            url,
            session: String::new(),
            http,
        };
        let v = b.call(reqwest::Method::POST, "/session", caps).await;
        b.session = v["sessionId"].as_str().expect("a session").to_owned();
        Some(b)
    }

    async fn call(&self, method: reqwest::Method, path: &str, body: Value) -> Value {
        let url = if path == "/session" {
            format!("{}{path}", self.url)
        } else {
            format!("{}/session/{}{path}", self.url, self.session)
        };
        let mut req = self.http.request(method.clone(), url);
        if method != reqwest::Method::GET {
            req = req.json(&body);
        }
        let v: Value = req.send().await.unwrap().json().await.unwrap();
        assert!(
            v["value"]["error"].is_null(),
            "WebDriver {method} {path}: {v}"
        );
        v["value"].clone()
    }

    async fn goto(&self, url: &str) {
        self.call(reqwest::Method::POST, "/url", json!({ "url": url }))
            .await;
    }

    async fn find(&self, css: &str) -> String {
        let v = self
            .call(
                reqwest::Method::POST,
                "/element",
                json!({"using": "css selector", "value": css}),
            )
            .await;
        v[ELEMENT]
            .as_str()
            .unwrap_or_else(|| panic!("no element {css}: {v}"))
            .to_owned()
    }

    async fn type_into(&self, css: &str, text: &str) {
        let e = self.find(css).await;
        self.call(
            reqwest::Method::POST,
            &format!("/element/{e}/value"),
            json!({ "text": text }),
        )
        .await;
    }

    async fn click(&self, css: &str) {
        let e = self.find(css).await;
        self.call(
            reqwest::Method::POST,
            &format!("/element/{e}/click"),
            json!({}),
        )
        .await;
    }

    /// Runs `script` in the page and answers its return value.
    async fn js(&self, script: &str) -> Value {
        self.call(
            reqwest::Method::POST,
            "/execute/sync",
            json!({"script": script, "args": []}),
        )
        .await
    }

    /// Waits until `script` returns true in the page.
    async fn wait_for(&self, what: &str, script: &str) {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if self.js(script).await == json!(true) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{what}: never true; the page: {}",
                self.js("return document.body.innerText").await
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Sets the window's width and saves a screenshot under target/console-screenshots/.
    async fn screenshot(&self, name: &str, width: u32) -> PathBuf {
        self.call(
            reqwest::Method::POST,
            "/window/rect",
            json!({"width": width, "height": 900}),
        )
        .await;
        // Let the layout settle at the new width.
        tokio::time::sleep(Duration::from_millis(300)).await;
        let png = self
            .call(reqwest::Method::GET, "/screenshot", Value::Null)
            .await;
        let bytes = otm_core::base64::decode(png.as_str().unwrap()).expect("a PNG");
        assert!(bytes.starts_with(b"\x89PNG"), "a PNG");
        let dir =
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../target/console-screenshots");
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join(format!("{name}-{width}.png"));
        std::fs::write(&path, bytes).unwrap();
        let path = path.canonicalize().unwrap();
        println!("screenshot: {}", path.display());
        path
    }

    /// What the page logged to the browser console at level SEVERE since the last call.
    async fn errors(&self) -> Vec<Value> {
        self.call(reqwest::Method::POST, "/se/log", json!({"type": "browser"}))
            .await
            .as_array()
            .cloned()
            .unwrap_or_default()
            .into_iter()
            .filter(|e| e["level"] == "SEVERE")
            .collect()
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = self.driver.kill();
        let _ = self.driver.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_browser_signs_in_sees_the_fleet_follows_a_log_and_takes_screenshots() {
    let h = Harness::start_with(|s| {
        s.bot_chat_interval_ms = 0;
        s.max_delivery_attempts = 1;
        s.wake_timeout_s = 30;
    })
    .await;
    // Three tenants in three states: one awake, one asleep, one whose wake failed (the
    // openclaw profile with no OpenClaw installed where this server looks).
    let secret = h.tenant("awake", "7201:AWAKE").await;
    h.tenant("asleep", "7202:ASLEEP").await;
    let (status, body) = h
        .api(
            reqwest::Method::POST,
            "/tenants",
            Some(json!({"id": "broken", "profile": "openclaw"})),
        )
        .await;
    assert_eq!(status, 201, "{body}");
    let (status, body) = h
        .api(reqwest::Method::POST, "/tenants/awake/wake", None)
        .await;
    assert_eq!(status, 200, "{body}");
    // A dead letter: the agent cannot send its reply once, and one attempt is all it gets.
    h.tg.fail_next_send(1);
    assert_eq!(
        h.post_update("awake", &secret, &text_update(31, 9, "lost"))
            .await,
        200
    );
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let (_, inbox) = h
            .api(reqwest::Method::GET, "/tenants/awake/inbox", None)
            .await;
        if inbox["dead"].as_array().is_some_and(|d| !d.is_empty()) {
            break;
        }
        assert!(Instant::now() < deadline, "no dead letter: {inbox}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (status, body) = h
        .api(reqwest::Method::POST, "/tenants/broken/wake", None)
        .await;
    assert_ne!(status, 200, "the broken tenant's wake fails: {body}");

    let Some(b) = Browser::start().await else {
        h.stop().await;
        return;
    };
    let admin = format!("http://{}", h.server().admin_addr);

    // Not signed in: the console sends the browser to the sign-in form, which works without
    // the page's script.
    b.goto(&format!("{admin}/")).await;
    b.wait_for("the sign-in page", "return location.pathname === '/signin'")
        .await;
    b.type_into("#token", &h.token).await;
    b.click("form.signin button").await;
    b.wait_for("the fleet page", "return location.pathname === '/'")
        .await;
    for (tenant, state) in [
        ("awake", "awake"),
        ("asleep", "asleep"),
        ("broken", "failed"),
    ] {
        b.wait_for(
            &format!("{tenant} shown {state}"),
            &format!(
                "var r = document.querySelector('tr[data-tenant=\"{tenant}\"]'); \
                 return !!r && r.getAttribute('data-state') === '{state}'"
            ),
        )
        .await;
    }
    // Live: a tenant put to sleep through the API turns asleep on the open page, which is not
    // reloaded (the marker set here would be gone).
    b.js("window.otmMarker = true; return true").await;
    let (status, _) = h
        .api(reqwest::Method::POST, "/tenants/awake/stop", None)
        .await;
    assert_eq!(status, 200);
    b.wait_for(
        "awake shown asleep without a reload",
        "var r = document.querySelector('tr[data-tenant=\"awake\"]'); \
         return !!r && r.getAttribute('data-state') === 'asleep' && !!window.otmMarker",
    )
    .await;
    let fleet_shots = [
        b.screenshot("fleet", 1280).await,
        b.screenshot("fleet", 390).await,
    ];

    // The tenant page: wake it with its button, then follow a log line appear.
    b.call(
        reqwest::Method::POST,
        "/window/rect",
        json!({"width": 1280, "height": 900}),
    )
    .await;
    b.goto(&format!("{admin}/tenants/awake")).await;
    b.click("form[action='/tenants/awake/wake'] button").await;
    b.wait_for(
        "the tenant awake after its wake button",
        "var s = document.querySelector('#tenant-live [data-state]'); \
         return !!s && s.getAttribute('data-state') === 'awake'",
    )
    .await;
    // The dead letter, with its retry and drop buttons.
    b.wait_for(
        "the dead letter of update 31",
        "var r = document.querySelector('#tenant-live tr[data-seq]'); \
         return !!r && r.textContent.indexOf('31') >= 0 \
           && !!r.querySelector('form[action$=\"/retry\"] button') \
           && !!r.querySelector('form[action$=\"/drop\"] button')",
    )
    .await;
    // Retried, it is delivered and answered.
    let before = h.tg.sent_messages("7201:AWAKE").len();
    b.click("#tenant-live tr[data-seq] form[action$='/retry'] button")
        .await;
    b.wait_for(
        "no dead letters after the retry",
        "return !!document.getElementById('no-dead-letters')",
    )
    .await;
    h.tg.wait_for_messages("7201:AWAKE", before + 1, Duration::from_secs(60))
        .await;
    b.wait_for(
        "the log tail",
        "return document.getElementById('log').textContent.length > 0",
    )
    .await;
    assert_eq!(
        h.post_update("awake", &secret, &text_update(4242, 9, "hello console"))
            .await,
        200
    );
    b.wait_for(
        "the log line of update 4242",
        "return document.getElementById('log').textContent.indexOf('4242') >= 0",
    )
    .await;
    let tenant_shots = [
        b.screenshot("tenant", 1280).await,
        b.screenshot("tenant", 390).await,
    ];
    for p in fleet_shots.iter().chain(&tenant_shots) {
        assert!(
            std::fs::metadata(p).unwrap().len() > 1000,
            "{}",
            p.display()
        );
    }

    // The pages stay small and use nothing from elsewhere.
    let size: u64 = b
        .js("return document.documentElement.outerHTML.length")
        .await
        .as_u64()
        .unwrap();
    assert!(size < 200_000, "the tenant page is {size} bytes");
    let errors = b.errors().await;
    assert!(
        errors.is_empty(),
        "the browser console shows errors: {errors:#?}"
    );
    h.stop().await;
}
