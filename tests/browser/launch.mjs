// Starts Debian's Chromium (headless) as every browser test does: the one
// place its flags are. Without the background-networking flags Chromium
// keeps trying to reach Google's hosts, which this machine's network refuses.
import { chromium } from "playwright-core";

export function launchChromium() {
  return chromium.launch({
    executablePath: process.env.CHROMIUM ?? "/usr/bin/chromium",
    args: [
      "--headless",
      "--no-sandbox",
      "--disable-gpu",
      "--disable-background-networking",
      "--disable-component-update",
      "--disable-sync",
      "--no-first-run",
    ],
  });
}
