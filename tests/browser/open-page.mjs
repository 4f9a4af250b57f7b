// Opens one page in Debian's Chromium (headless), waits until `selector` is
// on it, saves a screenshot, and prints one JSON line: every request the page
// made (URL and whether it failed) and the console errors. Used by the Rust
// tests in tests/tests/e2e, which judge the result.
//
//   node open-page.mjs URL SELECTOR SCREENSHOT.png
import { launchChromium } from "./launch.mjs";

const [url, selector, screenshot] = process.argv.slice(2);
if (!url || !selector || !screenshot) {
  console.error("usage: node open-page.mjs URL SELECTOR SCREENSHOT.png");
  process.exit(2);
}

const browser = await launchChromium();
try {
  const page = await browser.newPage({ viewport: { width: 1280, height: 800 } });
  const requests = [];
  const consoleErrors = [];
  page.on("request", (request) =>
    requests.push({
      url: request.url(),
      method: request.method(),
      resourceType: request.resourceType(),
      failed: false,
    }),
  );
  page.on("requestfailed", (request) => {
    const seen = requests.find((r) => r.url === request.url() && !r.failed);
    if (seen) seen.failed = true;
  });
  page.on("console", (message) => {
    if (message.type() === "error") consoleErrors.push(message.text());
  });
  page.on("pageerror", (error) => consoleErrors.push(String(error)));
  await page.goto(url, { waitUntil: "load", timeout: 30000 });
  await page.waitForSelector(selector, { timeout: 30000 });
  await page.waitForLoadState("networkidle", { timeout: 30000 });
  await page.screenshot({ path: screenshot });
  console.log(JSON.stringify({ requests, consoleErrors }));
} finally {
  await browser.close();
}
