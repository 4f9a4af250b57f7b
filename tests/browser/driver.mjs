// Drives one page of Debian's Chromium (headless) step by step for a Rust
// test (tests/src/browser.rs, `Browser`), so that the test's own logic runs
// between the browser's steps: publish an event, read a receiver, then look
// at the page again.
//
// Protocol, JSON lines: prints {"ready":true} once the page is open, then
// reads one command a line on stdin, e.g. {"cmd":"goto","url":"http://..."},
// and answers each with one line, {"ok":true,"value":...} or
// {"ok":false,"error":"..."}. A bad command is answered, never fatal: a test
// should fail on its own assertion, with the driver still there to ask.
// {"cmd":"close"}, or the end of stdin, closes the browser and exits 0.
// Only answers go to stdout; anything else goes to stderr.
//
//   node driver.mjs
import { mkdir, readFile } from "node:fs/promises";
import { dirname, join } from "node:path";
import { createInterface } from "node:readline";
import { fileURLToPath } from "node:url";
import { launchChromium } from "./launch.mjs";

// Every step's bound: a portal page on loopback loads in well under a second,
// so a step that takes this long is stuck, and the test should say so.
const STEP_MS = 15000;

const here = dirname(fileURLToPath(import.meta.url));

const browser = await launchChromium();
let closing = false;
browser.on("disconnected", () => {
  if (!closing) console.error("driver.mjs: the browser went away; every step will fail from here");
});
const context = await browser.newContext({ viewport: { width: 1280, height: 800 } });
const page = await context.newPage();
page.setDefaultTimeout(STEP_MS);
page.setDefaultNavigationTimeout(STEP_MS);

// Recorded from before the first navigation, so that nothing the page does
// escapes the test: a request that leaves the server, a CSP refusal.
const requests = [];
const recorded = new WeakMap();
const consoleErrors = [];
page.on("request", (request) => {
  const entry = {
    url: request.url(),
    method: request.method(),
    resourceType: request.resourceType(),
    failed: false,
  };
  recorded.set(request, entry);
  requests.push(entry);
});
page.on("requestfailed", (request) => {
  const entry = recorded.get(request);
  if (entry) entry.failed = true;
});
page.on("console", (message) => {
  if (message.type() === "error") consoleErrors.push(message.text());
});
page.on("pageerror", (error) => consoleErrors.push(String(error)));

// Read when first asked for: most tests never run axe.
let axeSource;

function need(args, ...names) {
  for (const name of names) {
    if (typeof args[name] !== "string") throw new Error(`needs "${name}" (a string)`);
  }
}

function timeoutOf(args) {
  if (args.timeoutMs === undefined) return STEP_MS;
  if (typeof args.timeoutMs !== "number" || !(args.timeoutMs >= 0)) {
    throw new Error('"timeoutMs" must be a number of milliseconds');
  }
  return args.timeoutMs;
}

// After an action that may have navigated: the action itself waits until a
// navigation it started has committed (Playwright's default), and this waits
// for the new document's load, so the next step sees the page the redirect
// led to. Without a navigation the current document has long loaded.
async function settled() {
  await page.waitForLoadState("load");
}

const commands = {
  async goto({ url }) {
    need({ url }, "url");
    const response = await page.goto(url, { waitUntil: "load" });
    return { status: response ? response.status() : null, url: page.url() };
  },
  async click(args) {
    need(args, "selector");
    await page.click(args.selector);
    await settled();
    return null;
  },
  async fill(args) {
    need(args, "selector", "value");
    await page.fill(args.selector, args.value);
    return null;
  },
  async select(args) {
    need(args, "selector", "value");
    await page.selectOption(args.selector, args.value);
    await settled();
    return null;
  },
  async check(args) {
    need(args, "selector");
    await page.check(args.selector);
    await settled();
    return null;
  },
  async uncheck(args) {
    need(args, "selector");
    await page.uncheck(args.selector);
    await settled();
    return null;
  },
  async press(args) {
    need(args, "key");
    // Pressed on the focused element when there is one, so that Enter in a
    // form waits for the submission's navigation as a click does; the bare
    // keyboard would not.
    const onElement = await page.evaluate(
      () => document.activeElement !== null && document.activeElement !== document.body,
    );
    if (onElement) await page.press("*:focus", args.key);
    else await page.keyboard.press(args.key);
    await settled();
    return null;
  },
  async focused() {
    return await page.evaluate(() => {
      const element = document.activeElement;
      if (!element) return { tag: "", id: null, name: null, text: "" };
      return {
        tag: element.tagName.toLowerCase(),
        id: element.id || null,
        name: element.getAttribute("name"),
        text: (element.innerText ?? element.textContent ?? "").trim().slice(0, 80),
      };
    });
  },
  async text(args) {
    need(args, "selector");
    return await page.locator(args.selector).first().innerText();
  },
  async texts(args) {
    need(args, "selector");
    return await page.locator(args.selector).allInnerTexts();
  },
  async count(args) {
    need(args, "selector");
    return await page.locator(args.selector).count();
  },
  async attribute(args) {
    need(args, "selector", "name");
    return await page.locator(args.selector).first().getAttribute(args.name);
  },
  async waitFor(args) {
    need(args, "selector");
    await page.locator(args.selector).first().waitFor({ state: "visible", timeout: timeoutOf(args) });
    return null;
  },
  async waitForText(args) {
    need(args, "selector", "text");
    // Polled from here rather than with waitForFunction, so that it takes the
    // same selectors as every other command.
    const deadline = Date.now() + timeoutOf(args);
    let seen = null;
    for (;;) {
      const element = page.locator(args.selector).first();
      if ((await element.count()) > 0) {
        seen = await element.innerText({ timeout: 1000 }).catch(() => seen);
        if (seen !== null && seen.includes(args.text)) return seen;
      }
      if (Date.now() >= deadline) {
        throw new Error(
          `"${args.selector}" did not come to contain ${JSON.stringify(args.text)} ` +
            `within ${timeoutOf(args)} ms; its text: ${JSON.stringify(seen)}`,
        );
      }
      await new Promise((resolve) => setTimeout(resolve, 100));
    }
  },
  async url() {
    return page.url();
  },
  async content() {
    return await page.content();
  },
  async screenshot(args) {
    need(args, "path");
    await mkdir(dirname(args.path), { recursive: true });
    await page.screenshot({ path: args.path, fullPage: true });
    return null;
  },
  async viewport({ width, height }) {
    if (!Number.isInteger(width) || !Number.isInteger(height) || width < 1 || height < 1) {
      throw new Error('needs "width" and "height" (positive whole numbers)');
    }
    await page.setViewportSize({ width, height });
    return null;
  },
  async axe() {
    // Evaluated over the DevTools protocol, which the page's
    // Content-Security-Policy does not govern: a <script> tag would be
    // refused by the portal's policy (and one loaded over the network would be
    // a request the tests forbid).
    axeSource ??= await readFile(join(here, "node_modules/axe-core/axe.min.js"), "utf8");
    if (!(await page.evaluate(() => typeof window.axe === "object"))) {
      await page.evaluate(axeSource);
    }
    return await page.evaluate(async () => {
      const results = await window.axe.run(document, { resultTypes: ["violations"] });
      return results.violations
        .filter((violation) => violation.impact === "serious" || violation.impact === "critical")
        .map((violation) => ({
          id: violation.id,
          impact: violation.impact,
          help: violation.help,
          nodes: violation.nodes.map((node) => node.target.map(String).join(" ")),
        }));
    });
  },
  async requests() {
    return requests;
  },
  async consoleErrors() {
    return consoleErrors;
  },
  async post(args) {
    need(args, "url");
    if (typeof args.form !== "object" || args.form === null) {
      throw new Error('needs "form" (an object of strings)');
    }
    const response = await page.request.post(args.url, {
      form: args.form,
      headers: args.headers ?? {},
      maxRedirects: 0,
      timeout: STEP_MS,
    });
    const body = await response.text();
    return { status: response.status(), body: body.slice(0, 2000) };
  },
  async cookies() {
    return (await context.cookies()).map((cookie) => ({
      name: cookie.name,
      value: cookie.value,
      domain: cookie.domain,
      path: cookie.path,
      httpOnly: cookie.httpOnly,
      secure: cookie.secure,
      sameSite: cookie.sameSite,
    }));
  },
  async setCookie(args) {
    need(args, "name", "value", "url");
    await context.addCookies([{ name: args.name, value: args.value, url: args.url }]);
    return null;
  },
};

// Playwright's own timeouts name what they waited for; this catches whatever
// has none (an evaluation, axe on a huge page) a little later.
function bounded(promise, ms) {
  let timer;
  const late = new Promise((_, reject) => {
    timer = setTimeout(() => reject(new Error(`no answer within ${ms} ms`)), ms);
  });
  return Promise.race([promise, late]).finally(() => clearTimeout(timer));
}

function answer(reply) {
  process.stdout.write(JSON.stringify(reply) + "\n");
}

async function shutdown() {
  closing = true;
  await browser.close().catch((error) => console.error(`driver.mjs: closing: ${error}`));
  process.exit(0);
}

answer({ ready: true });

const lines = createInterface({ input: process.stdin, crlfDelay: Infinity });
for await (const line of lines) {
  if (line.trim() === "") continue;
  let command;
  try {
    command = JSON.parse(line);
  } catch (error) {
    answer({ ok: false, error: `not JSON: ${error.message}` });
    continue;
  }
  if (command?.cmd === "close") {
    answer({ ok: true, value: null });
    await shutdown();
  }
  const run = Object.hasOwn(commands, command?.cmd) ? commands[command.cmd] : null;
  if (!run) {
    answer({ ok: false, error: `unknown command ${JSON.stringify(command?.cmd)}` });
    continue;
  }
  try {
    const asked = Number.isFinite(command.timeoutMs) ? command.timeoutMs : 0;
    const limit = Math.max(STEP_MS, asked) + 5000;
    const value = await bounded(run(command), limit);
    answer({ ok: true, value: value ?? null });
  } catch (error) {
    // Playwright colours its call logs for a terminal; the test prints them.
    const message = String(error?.message ?? error).replace(/\u001b\[[0-9;]*m/g, "");
    answer({ ok: false, error: `${command.cmd}: ${message}` });
  }
}
await shutdown();
