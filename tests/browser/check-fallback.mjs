// Opens the anytls server's own port (https://127.0.0.1:PORT/, run with --fallback) in
// headless chromium (Debian's, via playwright-core) and checks that the browser shows the
// fallback site's page, over HTTP/1.1 (what the server's ALPN chose for it).
//
// Usage: node check-fallback.mjs URL MARKER
// Exit 0 when the page passes; 1 with a reason otherwise. CHROMIUM overrides the browser.
import { launchChromium } from "./launch.mjs";

const [url, marker] = process.argv.slice(2);
if (!url || !marker) {
  console.error("usage: node check-fallback.mjs URL MARKER");
  process.exit(2);
}

const fail = (why) => { throw new Error(why); };
const browser = await launchChromium();
try {
  // The server's certificate is self-signed, as a test site's would be.
  const context = await browser.newContext({ ignoreHTTPSErrors: true });
  const page = await context.newPage();
  const response = await page.goto(url, { waitUntil: "load", timeout: 15000 });
  if (!response) fail("no response");
  if (response.status() !== 200) fail(`status ${response.status()}`);
  const text = (await page.textContent("#marker", { timeout: 5000 })) || "";
  if (text.trim() !== marker) fail(`page shows ${JSON.stringify(text)}, not the site's marker`);
  const protocol = await page.evaluate(() => performance.getEntriesByType("navigation")[0].nextHopProtocol);
  if (protocol !== "http/1.1") fail(`protocol ${protocol}, expected http/1.1`);
  const title = await page.title();
  console.log(`PASS: status ${response.status()}, title ${JSON.stringify(title)}, marker shown, protocol ${protocol}`);
} catch (err) {
  console.error(`FAIL: ${err.message}`);
  process.exitCode = 1;
} finally {
  await browser.close();
}
