// Headless chromium for the page checks: Debian's browser through playwright-core (no
// browser download), with the flags this machine's closed network needs. CHROMIUM
// overrides the browser's path.
import { chromium } from "playwright-core";

export function launchChromium() {
  return chromium.launch({
    executablePath: process.env.CHROMIUM || "/usr/bin/chromium",
    args: ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
           "--disable-sync", "--no-first-run"],
  });
}
