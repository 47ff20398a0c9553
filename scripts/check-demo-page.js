// Drives the demo page in headless Chromium; used by scripts/check-demo-page.
const { chromium } = require('playwright-core');
(async () => {
  const browser = await chromium.launch({ executablePath: '/usr/bin/chromium', args: ['--no-sandbox','--disable-gpu','--disable-background-networking','--disable-component-update','--no-first-run','--disable-sync'] });
  const page = await browser.newPage();
  await page.goto(process.env.DEMO_URL);
  await page.waitForSelector('#status.ok', { timeout: 5000 });
  await page.click('#sub');
  await page.waitForTimeout(300);
  const { execSync } = require('child_process');
  execSync(process.argv[2]);
  await page.click('#pub');
  await page.waitForFunction(() => document.querySelectorAll('#log .in').length >= 4, null, { timeout: 5000 });
  await page.screenshot({ path: process.env.SHOT });
  console.log(await page.$eval('#log', e => e.innerText));
  await browser.close();
})().catch(e => { console.error(e); process.exit(1); });
