// Loads the live page of a running anytls-rs binary in headless chromium (Debian's, via
// playwright-core: no browser download) on a phone-sized viewport and checks that the
// numbers render and then change while tests/api.rs drives traffic through the pair.
//
// Usage: node check-page.mjs URL SCREENSHOT.png
// Exit 0 when the page passes; 1 with a reason otherwise. CHROMIUM overrides the browser.
import { launchChromium } from "./launch.mjs";

const [url, screenshot] = process.argv.slice(2);
if (!url || !screenshot) {
  console.error("usage: node check-page.mjs URL SCREENSHOT.png");
  process.exit(2);
}

const fail = (why) => { throw new Error(why); };
const browser = await launchChromium();
try {
  const page = await browser.newPage({ viewport: { width: 390, height: 844 }, deviceScaleFactor: 2 });
  const errors = [];
  page.on("pageerror", (err) => errors.push(String(err)));
  page.on("console", (msg) => { if (msg.type() === "error") errors.push(msg.text()); });
  const requests = [];
  page.on("request", (req) => requests.push(req.url()));

  await page.goto(url, { waitUntil: "domcontentloaded", timeout: 15000 });
  await page.waitForFunction(() => Number(document.body.dataset.updates) >= 1, null, { timeout: 10000 });
  const read = () => page.evaluate(() => ({
    updates: Number(document.body.dataset.updates),
    hitRate: document.getElementById("hit-rate").textContent,
    total: document.getElementById("total").textContent,
    active: document.getElementById("active").textContent,
    idle: document.getElementById("idle").textContent,
    status: document.getElementById("status").textContent,
    rows: document.querySelectorAll("#targets tr td:not(.empty)").length,
  }));
  const first = await read();
  console.log("first render:", JSON.stringify(first));
  if (!/^\d+\.\d%$/.test(first.hitRate)) fail(`hit rate not rendered: ${first.hitRate}`);
  for (const key of ["total", "active", "idle"]) {
    if (!/^[\d,]+$/.test(first[key])) fail(`${key} not a number: ${first[key]}`);
  }
  if (!first.status.startsWith("live")) fail(`status: ${first.status}`);

  // Traffic flows meanwhile: the total must grow and the page keep updating.
  await page.waitForFunction(
    (before) => document.getElementById("total").textContent !== before && Number(document.body.dataset.updates) >= 3,
    first.total, { timeout: 20000 });
  const later = await read();
  console.log("later render:", JSON.stringify(later));
  if (later.rows === 0) fail("the per-target table is empty");
  const overflow = await page.evaluate(() => document.documentElement.scrollWidth - window.innerWidth);
  if (overflow > 0) fail(`the page is ${overflow}px wider than a 390px screen`);
  const foreign = requests.filter((r) => !r.startsWith(new URL(url).origin));
  if (foreign.length) fail(`requests outside the binary: ${foreign.join(", ")}`);
  if (errors.length) fail(`page errors: ${errors.join("; ")}`);
  await page.waitForTimeout(1500); // a few chart bars
  await page.screenshot({ path: screenshot, fullPage: true });
  console.log(`PASS: ${later.updates} updates, total ${first.total} -> ${later.total}; screenshot ${screenshot}`);
} catch (err) {
  console.error(`FAIL: ${err.message}`);
  process.exitCode = 1;
} finally {
  await browser.close();
}
