//! A real browser for the tests of pages: Debian's Chromium, driven with
//! playwright-core (which never downloads a browser of its own). [`visit`]
//! opens one page and reports on it (`tests/browser/open-page.mjs`);
//! [`Browser`] drives a page step by step (`tests/browser/driver.mjs`), so
//! that a test's own logic runs between the steps. `.ci/run` installs
//! Chromium and the npm packages; elsewhere a test that needs them says so
//! loudly and skips, and with `CI` set it fails.

use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::Deserialize;
use serde::de::DeserializeOwned;
use serde_json::{Value, json};

/// What the browser saw of one page.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PageVisit {
    /// Every request the page made, in order.
    pub requests: Vec<Request>,
    /// The console's errors and the page's uncaught exceptions.
    pub console_errors: Vec<String>,
}

/// One request the page made, as the browser saw it.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Request {
    /// The URL asked for.
    pub url: String,
    /// `GET`, `POST`, …
    pub method: String,
    /// Playwright's name for what it was for: `document`, `stylesheet`,
    /// `script`, `image`, `fetch`, …
    pub resource_type: String,
    /// Whether it got no response at all: refused by the page's policy, or a
    /// network error (an HTTP error status is still a response).
    pub failed: bool,
}

fn browser_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("browser")
}

fn chromium() -> PathBuf {
    std::env::var_os("CHROMIUM").map_or_else(|| PathBuf::from("/usr/bin/chromium"), PathBuf::from)
}

/// Whether the browser and its driver are installed; a loud notice (or, in
/// CI, a failure) when not.
pub fn available() -> bool {
    // Both packages, so that a tree installed before axe-core was added says so.
    let packages = [
        "node_modules/playwright-core/package.json",
        "node_modules/axe-core/axe.min.js",
    ];
    let missing = if !chromium().is_file() {
        Some(format!(
            "no Chromium at {} (apt-get install chromium)",
            chromium().display()
        ))
    } else if !packages.iter().all(|package| browser_dir().join(package).is_file()) {
        Some(format!(
            "the browser tests' npm packages are not installed (npm ci --prefix {})",
            browser_dir().display()
        ))
    } else if Command::new("node").arg("--version").output().is_err() {
        Some("no `node` on the PATH".to_owned())
    } else {
        None
    };
    let Some(why) = missing else { return true };
    if std::env::var_os("CI").is_some() {
        panic!("a browser test needs what .ci/run installs: {why}");
    }
    eprintln!("\n!!!!!!!! SKIPPING A BROWSER TEST: {why} !!!!!!!!\n");
    false
}

/// Opens `url`, waits for `selector`, saves a screenshot at `screenshot`
/// (the tests put them under the build's target folder: never committed) and
/// reports what the page did.
pub fn visit(url: &str, selector: &str, screenshot: &Path) -> PageVisit {
    if let Some(folder) = screenshot.parent() {
        std::fs::create_dir_all(folder).expect("create the screenshots folder");
    }
    let output = Command::new("node")
        .arg(browser_dir().join("open-page.mjs"))
        .args([url, selector])
        .arg(screenshot)
        .env("CHROMIUM", chromium())
        .output()
        .expect("run node");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "the browser failed on {url}: {}\n{stdout}",
        String::from_utf8_lossy(&output.stderr)
    );
    let report = stdout.lines().last().unwrap_or_default();
    serde_json::from_str(report).unwrap_or_else(|error| panic!("unreadable report ({error}): {stdout}"))
}

/// One headless Chromium with one page (1280×800), driven a step at a time by
/// `tests/browser/driver.mjs`, which records every request the page makes and
/// every console error from the start.
///
/// Synchronous: each method blocks until the browser has done the step (at
/// most 15 s, the driver's bound), so an async test drives it from
/// `tokio::task::spawn_blocking` or a plain thread, never on a runtime worker,
/// where it would stall the servers the test runs on the same runtime. Inside
/// `spawn_blocking`, `tokio::runtime::Handle::current().block_on(...)` runs
/// the test's async steps between the browser's.
///
/// A step the browser cannot do panics, naming the step and the driver's
/// error, so a test reads as a plain script. Dropping it closes Chromium.
pub struct Browser {
    child: Child,
    /// `None` once closed.
    stdin: Option<ChildStdin>,
    /// The driver's answers, a line each, read by a thread of their own so
    /// that waiting for one can have a deadline: a wedged browser fails the
    /// test instead of hanging it.
    answers: Receiver<String>,
    /// The tail of node's stderr (Playwright's and Chromium's complaints),
    /// shown when a step fails.
    stderr: Arc<Mutex<String>>,
}

impl std::fmt::Debug for Browser {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter
            .debug_struct("Browser")
            .field("pid", &self.child.id())
            .finish()
    }
}

/// Where a navigation ended.
#[derive(Debug, Clone, Deserialize)]
pub struct Navigation {
    /// The HTTP status of the page's own response, after redirects; `None`
    /// when there was none (a same-document navigation).
    pub status: Option<u16>,
    /// The page's URL once loaded.
    pub url: String,
}

/// The element that has the keyboard focus.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct Focused {
    /// Its tag, lower case: `input`, `button`, `a`, `body` when nothing is focused.
    pub tag: String,
    /// Its `id` attribute.
    pub id: Option<String>,
    /// Its `name` attribute.
    pub name: Option<String>,
    /// Its rendered text, trimmed, at most 80 characters.
    pub text: String,
}

/// One of axe-core's findings that a person would be stopped by: impact
/// `serious` or `critical`.
#[derive(Debug, Clone, Deserialize)]
pub struct Violation {
    /// axe's rule: `label`, `color-contrast`, `image-alt`, …
    pub id: String,
    /// `serious` or `critical`.
    pub impact: String,
    /// What the rule asks for, in a sentence.
    pub help: String,
    /// A CSS selector for each element that breaks it.
    pub nodes: Vec<String>,
}

/// A cookie of the browser's, for every site.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Cookie {
    /// Its name.
    pub name: String,
    /// Its value.
    pub value: String,
    /// The host it is sent to.
    pub domain: String,
    /// The path it is sent under.
    pub path: String,
    /// Whether the page's scripts cannot read it.
    pub http_only: bool,
    /// Whether it is sent over HTTPS only.
    pub secure: bool,
    /// `Strict`, `Lax` or `None`.
    pub same_site: String,
}

/// The answer to [`Browser::post`]: not followed, so a redirect shows as itself.
#[derive(Debug, Clone, Deserialize)]
pub struct PostResponse {
    /// The HTTP status.
    pub status: u16,
    /// The first 2,000 characters of the body.
    pub body: String,
}

/// One line of the driver's: `ok` with a value, or the error.
#[derive(Deserialize)]
struct Answer {
    ok: bool,
    #[serde(default)]
    value: Value,
    #[serde(default)]
    error: Option<String>,
}

/// How long Chromium may take to start: far more than it needs, for a loaded
/// two-core CI machine.
const LAUNCH_WITHIN: Duration = Duration::from_secs(60);
/// The driver bounds each step at 15 s (and at the step's own timeout plus 5 s);
/// past this it is not coming back.
const ANSWER_WITHIN: Duration = Duration::from_secs(30);
/// What is kept of node's stderr: the end is what explains a failure.
const STDERR_KEPT: usize = 64 * 1024;

impl Browser {
    /// Starts Chromium with one blank page and waits until it is ready.
    /// Call [`available`] first.
    pub fn launch() -> Browser {
        let mut child = Command::new("node")
            .arg(browser_dir().join("driver.mjs"))
            .env("CHROMIUM", chromium())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("run node");
        let stdin = child.stdin.take().expect("node's stdin");
        let stdout = child.stdout.take().expect("node's stdout");
        let mut stderr_pipe = child.stderr.take().expect("node's stderr");

        let (sender, answers) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if sender.send(line).is_err() {
                    break;
                }
            }
        });
        let stderr = Arc::new(Mutex::new(String::new()));
        let kept = Arc::clone(&stderr);
        std::thread::spawn(move || {
            let mut chunk = [0_u8; 4096];
            while let Ok(read) = stderr_pipe.read(&mut chunk) {
                if read == 0 {
                    break;
                }
                let mut kept = kept.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
                kept.push_str(&String::from_utf8_lossy(&chunk[..read]));
                if kept.len() > STDERR_KEPT {
                    let mut cut = kept.len() - STDERR_KEPT;
                    while !kept.is_char_boundary(cut) {
                        cut += 1;
                    }
                    kept.drain(..cut);
                }
            }
        });

        let mut browser = Browser {
            child,
            stdin: Some(stdin),
            answers,
            stderr,
        };
        let ready = browser.next_line("launch", LAUNCH_WITHIN);
        let ready: Value = serde_json::from_str(&ready).unwrap_or(Value::Null);
        if ready.get("ready") != Some(&Value::Bool(true)) {
            browser.fail("launch", &format!("the driver said {ready} instead of being ready"));
        }
        browser
    }

    /// Opens `url` and waits for it to load; an HTTP error status is an
    /// answer, not a failure.
    pub fn goto(&mut self, url: &str) -> Navigation {
        self.call("goto", json!({ "url": url }))
    }

    /// Clicks the first element matching `selector` and, when that navigates
    /// (a form's POST and its 303), waits until the page it leads to has loaded.
    pub fn click(&mut self, selector: &str) {
        self.call::<Value>("click", json!({ "selector": selector }));
    }

    /// Types `value` into a text field, replacing what was there.
    pub fn fill(&mut self, selector: &str, value: &str) {
        self.call::<Value>("fill", json!({ "selector": selector, "value": value }));
    }

    /// Chooses the option of a `<select>` whose value (or else label) is `value`.
    pub fn select(&mut self, selector: &str, value: &str) {
        self.call::<Value>("select", json!({ "selector": selector, "value": value }));
    }

    /// Ticks a checkbox or chooses a radio button.
    pub fn check(&mut self, selector: &str) {
        self.call::<Value>("check", json!({ "selector": selector }));
    }

    /// Unticks a checkbox.
    pub fn uncheck(&mut self, selector: &str) {
        self.call::<Value>("uncheck", json!({ "selector": selector }));
    }

    /// Presses `key` (Playwright's names: `Tab`, `Enter`, `Shift+Tab`,
    /// `Escape`, `a`) where the focus is, waiting for a navigation it starts.
    pub fn press(&mut self, key: &str) {
        self.call::<Value>("press", json!({ "key": key }));
    }

    /// The element that has the keyboard focus.
    pub fn focused(&mut self) -> Focused {
        self.call("focused", json!({}))
    }

    /// The rendered text of the first element matching `selector`, waiting
    /// for one to appear.
    pub fn text(&mut self, selector: &str) -> String {
        self.call("text", json!({ "selector": selector }))
    }

    /// The rendered text of every element matching `selector`, in document
    /// order; none is an empty list, not a wait.
    pub fn texts(&mut self, selector: &str) -> Vec<String> {
        self.call("texts", json!({ "selector": selector }))
    }

    /// How many elements match `selector` now.
    pub fn count(&mut self, selector: &str) -> usize {
        self.call("count", json!({ "selector": selector }))
    }

    /// An attribute of the first element matching `selector`, waiting for
    /// one to appear; `None` when it has no such attribute.
    pub fn attribute(&mut self, selector: &str, name: &str) -> Option<String> {
        self.call("attribute", json!({ "selector": selector, "name": name }))
    }

    /// Waits (15 s at most) until an element matching `selector` is visible.
    pub fn wait_for(&mut self, selector: &str) {
        self.call::<Value>("waitFor", json!({ "selector": selector }));
    }

    /// Waits, `timeout` at most, until an element matching `selector` is visible.
    pub fn wait_for_within(&mut self, selector: &str, timeout: Duration) {
        self.call::<Value>("waitFor", json!({ "selector": selector, "timeoutMs": millis(timeout) }));
    }

    /// Waits (15 s at most) until the first element matching `selector`
    /// shows `text`, and returns all it shows: for what the page learns
    /// after it loaded.
    pub fn wait_for_text(&mut self, selector: &str, text: &str) -> String {
        self.call("waitForText", json!({ "selector": selector, "text": text }))
    }

    /// [`Browser::wait_for_text`], `timeout` at most.
    pub fn wait_for_text_within(&mut self, selector: &str, text: &str, timeout: Duration) -> String {
        self.call(
            "waitForText",
            json!({ "selector": selector, "text": text, "timeoutMs": millis(timeout) }),
        )
    }

    /// The page's URL.
    pub fn url(&mut self) -> String {
        self.call("url", json!({}))
    }

    /// The page's HTML as it stands.
    pub fn content(&mut self) -> String {
        self.call("content", json!({}))
    }

    /// Saves a screenshot of the whole page (not only the viewport) at
    /// `path`, making its folders; tests put them under the build's target
    /// folder, never committed.
    pub fn screenshot(&mut self, path: &Path) {
        let path = std::path::absolute(path).expect("the screenshot's path");
        let path = path.to_str().expect("a screenshot path in UTF-8");
        self.call::<Value>("screenshot", json!({ "path": path }));
    }

    /// Resizes the page, to see it as a phone or a narrow window would.
    pub fn viewport(&mut self, width: u32, height: u32) {
        self.call::<Value>("viewport", json!({ "width": width, "height": height }));
    }

    /// Runs axe-core on the page as it stands and returns its serious and
    /// critical findings. axe is evaluated over the DevTools protocol, which
    /// the page's Content-Security-Policy does not govern, and comes from
    /// `node_modules`: the check adds no request to [`Browser::requests`].
    pub fn axe(&mut self) -> Vec<Violation> {
        self.call("axe", json!({}))
    }

    /// Every request the page has made since launch, in order. Those of
    /// [`Browser::post`] are not the page's and are not among them.
    pub fn requests(&mut self) -> Vec<Request> {
        self.call("requests", json!({}))
    }

    /// Every console error and uncaught exception since launch; a
    /// Content-Security-Policy refusal is one.
    pub fn console_errors(&mut self) -> Vec<String> {
        self.call("consoleErrors", json!({}))
    }

    /// POSTs `form` (url-encoded) to `url` with the browser's cookies but
    /// from no page: what another site's form could send, without the
    /// page's hidden fields unless given. Redirects are not followed.
    pub fn post(&mut self, url: &str, form: &[(&str, &str)]) -> PostResponse {
        self.post_with_headers(url, form, &[])
    }

    /// [`Browser::post`] with extra request headers, e.g. the `Origin` of
    /// another site: this POST sends none of its own.
    pub fn post_with_headers(&mut self, url: &str, form: &[(&str, &str)], headers: &[(&str, &str)]) -> PostResponse {
        let object = |pairs: &[(&str, &str)]| {
            pairs
                .iter()
                .map(|(key, value)| ((*key).to_owned(), Value::from(*value)))
                .collect::<serde_json::Map<_, _>>()
        };
        self.call(
            "post",
            json!({ "url": url, "form": object(form), "headers": object(headers) }),
        )
    }

    /// The browser's cookies, for every site.
    pub fn cookies(&mut self) -> Vec<Cookie> {
        self.call("cookies", json!({}))
    }

    /// Sets a cookie for `url`'s site (a plain one: not HttpOnly, not
    /// Secure), replacing one of the same name: a forged or tampered cookie.
    pub fn set_cookie(&mut self, name: &str, value: &str, url: &str) {
        self.call::<Value>("setCookie", json!({ "name": name, "value": value, "url": url }));
    }

    /// Closes Chromium and waits for the driver to exit; dropping the
    /// `Browser` does the same without saying whether it went well.
    pub fn close(mut self) {
        self.call::<Value>("close", json!({}));
        self.stdin = None;
        let status = self.wait_for_exit(Duration::from_secs(10));
        if status.is_none_or(|status| !status.success()) {
            self.fail("close", &format!("the driver did not exit cleanly: {status:?}"));
        }
    }

    /// Sends one command and reads its answer, panicking on an error.
    fn call<T: DeserializeOwned>(&mut self, command: &str, mut arguments: Value) -> T {
        arguments["cmd"] = Value::from(command);
        let within = ANSWER_WITHIN
            + arguments
                .get("timeoutMs")
                .and_then(Value::as_u64)
                .map_or(Duration::ZERO, Duration::from_millis);
        let Some(stdin) = self.stdin.as_mut() else {
            self.fail(command, "the browser is closed")
        };
        let sent = writeln!(stdin, "{arguments}").and_then(|()| stdin.flush());
        if let Err(error) = sent {
            self.fail(command, &format!("could not write to the driver: {error}"));
        }
        let line = self.next_line(command, within);
        let answer: Answer = serde_json::from_str(&line)
            .unwrap_or_else(|error| self.fail(command, &format!("unreadable answer ({error}): {line}")));
        if !answer.ok {
            let error = answer.error.unwrap_or_else(|| "(no error given)".to_owned());
            self.fail(command, &error);
        }
        serde_json::from_value(answer.value.clone())
            .unwrap_or_else(|error| self.fail(command, &format!("unexpected value ({error}): {}", answer.value)))
    }

    /// The driver's next line of JSON. Anything else on its stdout (which
    /// only a library printing where it should not would put there) is kept
    /// with its stderr rather than taken for an answer.
    fn next_line(&mut self, command: &str, within: Duration) -> String {
        let deadline = Instant::now() + within;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.answers.recv_timeout(left) {
                Ok(line) if line.trim_start().starts_with('{') => return line,
                Ok(line) => self.kept_stderr().push_str(&format!("(stdout) {line}\n")),
                Err(RecvTimeoutError::Timeout) => {
                    self.fail(command, &format!("no answer within {} s", within.as_secs()))
                }
                Err(RecvTimeoutError::Disconnected) => {
                    let status = self.wait_for_exit(Duration::from_secs(5));
                    self.fail(command, &format!("the driver exited ({status:?})"))
                }
            }
        }
    }

    fn kept_stderr(&self) -> std::sync::MutexGuard<'_, String> {
        self.stderr.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn wait_for_exit(&mut self, within: Duration) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + within;
        loop {
            match self.child.try_wait() {
                Ok(Some(status)) => return Some(status),
                Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(50)),
                _ => return None,
            }
        }
    }

    fn fail(&self, command: &str, error: &str) -> ! {
        // A moment for the stderr thread to catch up with a driver that just died.
        std::thread::sleep(Duration::from_millis(200));
        let stderr = self.kept_stderr().clone();
        if stderr.trim().is_empty() {
            panic!("the browser's `{command}` failed: {error}");
        }
        panic!("the browser's `{command}` failed: {error}\n--- the driver's stderr ---\n{stderr}");
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        // Closing stdin is the driver's cue to close Chromium and exit (after
        // a step it may still be on, if a deadline made us give up on it);
        // killed, node takes Chromium with it, as Chromium exits when its
        // DevTools pipe closes.
        if let Some(mut stdin) = self.stdin.take() {
            let _ = writeln!(stdin, "{}", json!({ "cmd": "close" }));
        }
        if self.wait_for_exit(Duration::from_secs(10)).is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

fn millis(timeout: Duration) -> u64 {
    u64::try_from(timeout.as_millis()).unwrap_or(u64::MAX)
}
