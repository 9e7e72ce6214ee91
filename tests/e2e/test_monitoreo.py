"""End to end, where users live: the real Flask backend under gunicorn, lotecache in front of
it with the shipped config, and headless Chromium on the Monitoring page clicking
"Descargar JSON". Everything listens on 127.0.0.1 ephemeral ports."""
import json
import os
import pathlib
import shutil
import socket
import subprocess
import sys
import time
import http.cookiejar
import urllib.error
import urllib.request

import pytest
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support import expected_conditions
from selenium.webdriver.support.ui import WebDriverWait

ROOT = pathlib.Path(__file__).resolve().parents[2]
BACKEND = ROOT / "examples" / "legacy-backend"
ARTIFACTS = ROOT / "target" / "e2e-artifacts"
LOTECACHE = os.environ.get("LOTECACHE_BIN", str(ROOT / "target" / "debug" / "lotecache"))

FINISHED = "LOTE-2025-07-002"
IN_PROCESS = "LOTE-2025-07-005"


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port, proc, seconds=20):
    deadline = time.time() + seconds
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before listening on {port}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"nothing listens on {port} after {seconds}s")


def get_json(url, opener=None):
    try:
        with (opener or urllib.request.build_opener()).open(url, timeout=10) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"null")


def logged_in(proxy, usuario):
    """An HTTP client holding `usuario`'s session cookie, logged in through the proxy."""
    opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(http.cookiejar.CookieJar()))
    opener.open(f"{proxy}/login?usuario={usuario}", timeout=10).read()
    return opener


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("e2e")
    db = tmp / "legacy.db"
    subprocess.run([sys.executable, str(BACKEND / "seed.py"), str(db)], check=True)
    backend_port, proxy_port, admin_port = free_port(), free_port(), free_port()
    # The backend lets lotecache fetch with the service token, and tells it of finished and
    # re-processed batches on its admin port.
    secrets = {"LOTECACHE_SERVICE_TOKEN": "e2e-service-token", "LOTECACHE_ADMIN_TOKEN": "e2e-admin-token"}
    env = dict(os.environ, LEGACY_DB=str(db), GEN_DELAY="0.5", LOTECACHE_ADMIN_URL=f"http://127.0.0.1:{admin_port}",
               **secrets)
    backend = subprocess.Popen(
        [sys.executable, "-m", "gunicorn", "-w", "2", "-b", f"127.0.0.1:{backend_port}", "app:app"],
        cwd=BACKEND, env=env, stdout=open(tmp / "backend.log", "w"), stderr=subprocess.STDOUT)
    proxy = subprocess.Popen(
        [LOTECACHE, "serve", "--config", str(ROOT / "config" / "lotecache.toml"),
         "--listen", f"127.0.0.1:{proxy_port}", "--origin", f"http://127.0.0.1:{backend_port}",
         "--cache-dir", str(tmp / "cache"), "--admin-listen", f"127.0.0.1:{admin_port}"],
        env=dict(os.environ, **secrets), stdout=subprocess.DEVNULL, stderr=open(tmp / "lotecache.log", "w"))
    try:
        wait_port(backend_port, backend)
        wait_port(proxy_port, proxy)
        yield {
            "proxy": f"http://127.0.0.1:{proxy_port}",
            "backend": f"http://127.0.0.1:{backend_port}",
            "admin": f"http://127.0.0.1:{admin_port}",
            "tmp": tmp,
        }
    finally:
        for p in (proxy, backend):
            p.terminate()
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()


@pytest.fixture(scope="module")
def browser(stack):
    downloads = stack["tmp"] / "downloads"
    downloads.mkdir()
    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium") or "/usr/bin/chromium"
    for flag in ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage", f"--user-data-dir={stack['tmp'] / 'profile'}", "--window-size=1200,800"]:
        options.add_argument(flag)
    options.add_experimental_option("prefs", {"download.default_directory": str(downloads),
                                              "download.prompt_for_download": False,
                                              # a second download from one page needs this permission
                                              "profile.default_content_setting_values.automatic_downloads": 1})
    service = Service(executable_path=shutil.which("chromedriver") or "/usr/bin/chromedriver")
    driver = webdriver.Chrome(service=service, options=options)
    # Each download saved under its own GUID name: two downloads of one batch never collide.
    driver.execute_cdp_cmd("Browser.setDownloadBehavior",
                           {"behavior": "allowAndName", "downloadPath": str(downloads), "eventsEnabled": True})
    driver.downloads = downloads
    try:
        yield driver
    finally:
        driver.quit()


def click_download(driver, lote_id, timeout=30):
    """Clicks the row's "Descargar JSON" button and returns the bytes of the new download."""
    before = set(driver.downloads.iterdir())
    row = driver.find_element(By.CSS_SELECTOR, f'tr[data-lote-id="{lote_id}"]')
    button = row.find_element(By.TAG_NAME, "button")
    assert button.text == "Descargar JSON"
    button.click()
    deadline = time.time() + timeout
    while time.time() < deadline:
        new = [p for p in set(driver.downloads.iterdir()) - before
               if not p.name.endswith(".crdownload") and not p.name.startswith(".")]
        if new and not any(p.name.endswith(".crdownload") for p in driver.downloads.iterdir()):
            assert len(new) == 1, new
            return new[0].read_bytes()
        time.sleep(0.1)
    raise AssertionError(f"no download of {lote_id} within {timeout}s")


def assert_batch(body, lote_id):
    doc = json.loads(body)
    assert doc["metadata"]["lote_id"] == lote_id
    assert doc["archivos_procesados"], "a batch has processed files"
    assert all(f["lote_id"] == lote_id for f in doc["archivos_procesados"])
    return doc


def test_descargar_json_on_the_monitoring_page_through_lotecache(stack, browser):
    # Ana logs in (through the proxy, like every request of the page).
    browser.get(stack["proxy"] + "/login?usuario=ana")
    assert browser.find_element(By.ID, "usuario").text == "Usuario: ana"
    assert browser.find_element(By.TAG_NAME, "h2").text == "Historial de Lotes"
    rows = browser.find_elements(By.CSS_SELECTOR, "#historial-lotes tbody tr")
    assert len(rows) == 6
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    browser.save_screenshot(str(ARTIFACTS / "monitoreo.png"))

    # A finished batch, twice: generated once, the second click is served from the store.
    first = click_download(browser, FINISHED)
    second = click_download(browser, FINISHED)
    assert first == second, "both downloads must be byte-identical"
    assert_batch(first, FINISHED)
    status, entry = get_json(f"{stack['admin']}/entries/{FINISHED}_resultados.json")
    assert status == 200 and entry["hits"] == 1, entry
    assert entry["size"] == len(first)

    # A batch still being processed, twice: generated each time, never frozen into the store.
    proc1 = click_download(browser, IN_PROCESS)
    proc2 = click_download(browser, IN_PROCESS)
    assert assert_batch(proc1, IN_PROCESS)["metadata"]["estado"] == "en_proceso"
    assert_batch(proc2, IN_PROCESS)
    status, _ = get_json(f"{stack['admin']}/entries/{IN_PROCESS}_resultados.json")
    assert status == 404, "an en_proceso batch must never be stored"

    # The saved batch is never handed to someone the backend would refuse: each request is
    # checked with the backend first, and its refusal comes back as the backend sent it.
    url = f"{stack['proxy']}/download_batch_results/{FINISHED}"
    status, body = get_json(url)
    assert (status, body["error"]) == (401, "acceso denegado"), body
    status, body = get_json(url, logged_in(stack["proxy"], "luis"))
    assert status == 403 and "luis no tiene acceso" in body["detail"], body
    _, entry = get_json(f"{stack['admin']}/entries/{FINISHED}_resultados.json")
    assert entry["hits"] == 1, "refused requests are not served from the store"

    _, generations = get_json(stack["backend"] + "/api/generaciones")
    assert generations == {FINISHED: 1, IN_PROCESS: 2}, generations


BIG = "LOTE-2025-07-003"  # about 3 MB of results

# In the page: a download read up to `cut` bytes and cut off (its reader cancelled), then
# resumed from the bytes it got with `Range` and `If-Range`, as a download manager does; the
# parts joined and hashed.
RESUME_JS = """
const [url, cut, done] = arguments;
(async () => {
  const hex = async (bytes) => Array.from(new Uint8Array(await crypto.subtle.digest('SHA-256', bytes)))
    .map(b => b.toString(16).padStart(2, '0')).join('');
  const first = await fetch(url, {headers: {Range: 'bytes=0-'}});
  const etag = first.headers.get('ETag');
  const reader = first.body.getReader();
  const parts = [];
  let got = 0;
  while (got < cut) {
    const {value, done: end} = await reader.read();
    if (end) break;
    parts.push(value);
    got += value.length;
  }
  await reader.cancel();
  const rest = await fetch(url, {headers: {Range: `bytes=${got}-`, 'If-Range': etag}});
  const tail = new Uint8Array(await rest.arrayBuffer());
  const all = new Uint8Array(got + tail.length);
  let at = 0;
  for (const p of parts) { all.set(p, at); at += p.length; }
  all.set(tail, at);
  done({first: first.status, firstEncoding: first.headers.get('Content-Encoding'), etag, got,
        rest: rest.status, contentRange: rest.headers.get('Content-Range'),
        restEncoding: rest.headers.get('Content-Encoding'), length: all.length, sha256: await hex(all)});
})().catch(e => done({error: String(e)}));
"""


def metric(admin, sample):
    text = urllib.request.urlopen(f"{admin}/metrics", timeout=10).read().decode()
    for line in text.splitlines():
        if line.startswith(sample + " "):
            return float(line.split()[-1])
    return 0.0


def wait_variants(admin, key, n=2, seconds=60):
    deadline = time.time() + seconds
    while time.time() < deadline:
        status, entry = get_json(f"{admin}/entries/{key}")
        if status == 200 and len(entry["variants"]) == n:
            return entry
        time.sleep(0.2)
    raise AssertionError(f"{key} has no {n} variants after {seconds}s")


def test_a_compressed_download_is_saved_byte_identical_and_a_cut_one_resumes_with_range(stack, browser):
    import hashlib
    proxy, admin = stack["proxy"], stack["admin"]
    backend_json = logged_in(stack["backend"], "ana").open(
        f"{stack['backend']}/download_batch_results/{BIG}", timeout=30).read()
    browser.get(proxy + "/login?usuario=ana")

    # The first click is a miss (served uncompressed); the variants are built after it.
    first = click_download(browser, BIG, timeout=60)
    assert first == backend_json
    entry = wait_variants(admin, f"{BIG}_resultados.json")
    br = next(v for v in entry["variants"] if v["encoding"] == "br")
    assert br["size"] * 3 < entry["size"], entry

    # Chromium advertises br: the second click is the br variant, decoded and saved by the
    # browser byte for byte as the backend generates it.
    br_hits = metric(admin, 'lotecache_hit_encodings_total{encoding="br"}')
    second = click_download(browser, BIG, timeout=60)
    assert metric(admin, 'lotecache_hit_encodings_total{encoding="br"}') == br_hits + 1, "not sent as br"
    assert second == backend_json

    # A download cut after about 300 KB and resumed from where it stopped.
    got = browser.execute_async_script(RESUME_JS, f"{proxy}/download_batch_results/{BIG}", 300_000)
    assert "error" not in got, got
    assert got["first"] == 206 and got["rest"] == 206, got
    assert got["firstEncoding"] is None and got["restEncoding"] is None, "ranges are of the identity body"
    assert 0 < got["got"] < len(backend_json), got
    assert got["contentRange"] == f"bytes {got['got']}-{len(backend_json) - 1}/{len(backend_json)}", got
    assert got["length"] == len(backend_json)
    assert got["sha256"] == hashlib.sha256(backend_json).hexdigest(), "the resumed download differs"
    _, generations = get_json(stack["backend"] + "/api/generaciones")
    assert generations[BIG] == 2, generations  # this test's direct backend request, and one fill


PENDING = "LOTE-2025-07-006"  # en_proceso in the seed

CACHE_STATUS_JS = """
const [url, done] = arguments;
fetch(url).then(r => r.arrayBuffer().then(() => done(r.headers.get('Cache-Status')))).catch(e => done('error: ' + e));
"""


def post(opener, url):
    with opener.open(urllib.request.Request(url, data=b"", method="POST"), timeout=30) as r:
        return json.loads(r.read())


def wait_entry(admin, key, differs_from=None, seconds=30):
    deadline = time.time() + seconds
    while time.time() < deadline:
        status, entry = get_json(f"{admin}/entries/{key}")
        if status == 200 and entry["sha256"] != differs_from:
            return entry
        time.sleep(0.1)
    raise AssertionError(f"{key} was not stored (anew) within {seconds}s")


def test_a_finished_batch_is_already_a_hit_and_a_reprocessed_one_is_generated_once(stack, browser):
    proxy, admin, backend = stack["proxy"], stack["admin"], stack["backend"]
    key = f"{PENDING}_resultados.json"
    ana = logged_in(backend, "ana")
    assert get_json(f"{backend}/api/generaciones")[1].get(PENDING) is None

    # The batch's processing ends on the backend, which tells lotecache: it is fetched once,
    # with the service token, before anyone asks.
    done = post(ana, f"{backend}/api/lotes/{PENDING}/completar")
    assert (done["estado"], done["lotecache"]) == ("completado", "sent"), done
    stored = wait_entry(admin, key)
    assert get_json(f"{backend}/api/generaciones")[1][PENDING] == 1

    # Ana's click is a hit: the generation counter moved at completion, not now.
    browser.get(proxy + "/login?usuario=ana")
    first = click_download(browser, PENDING)
    assert assert_batch(first, PENDING)["metadata"]["estado"] == "completado"
    status = browser.execute_async_script(CACHE_STATUS_JS, f"{proxy}/download_batch_results/{PENDING}")
    assert status.startswith("lotecache; hit"), status
    _, entry = get_json(f"{admin}/entries/{key}")
    assert entry["hits"] == 2 and entry["sha256"] == stored["sha256"], entry
    assert get_json(f"{backend}/api/generaciones")[1][PENDING] == 1

    # Processed again: lotecache purges the old document and fetches the new one at once.
    post(ana, f"{backend}/api/lotes/{PENDING}/reprocesar")
    wait_entry(admin, key, differs_from=stored["sha256"])
    assert get_json(f"{backend}/api/generaciones")[1][PENDING] == 2
    second = click_download(browser, PENDING)
    assert second != first, "the re-processed batch's document"
    assert second == ana.open(f"{backend}/download_batch_results/{PENDING}", timeout=30).read()
    assert get_json(f"{backend}/api/generaciones")[1][PENDING] == 3, "once at re-processing, once just now for the comparison"


def rows(browser):
    return browser.find_elements(By.CSS_SELECTOR, "#entries tbody tr")


def wait_for(condition, seconds=10):
    deadline = time.time() + seconds
    while time.time() < deadline:
        try:
            if condition():
                return
        except Exception:  # the table is being redrawn
            pass
        time.sleep(0.1)
    raise AssertionError("condition not met within %ss" % seconds)


def confirm(browser):
    """Accepts the page's confirmation dialog once it is open."""
    WebDriverWait(browser, 10).until(expected_conditions.alert_is_present()).accept()


def column(browser, index):
    return [r.find_elements(By.TAG_NAME, "td")[index].text for r in rows(browser)]


def test_the_cache_page_lists_sorts_searches_and_purges_only_with_the_token(stack, browser):
    # The store is what the tests above left in it (this module's stack is shared): batches
    # with different hit counts.
    admin = stack["admin"]
    _, listed = get_json(f"{admin}/entries?limit=1000")
    stored_ids = sorted(e["lote_id"] for e in listed["entries"])
    assert len(stored_ids) >= 3, stored_ids  # what the tests above stored
    browser.get(admin + "/")
    wait_for(lambda: len(rows(browser)) == len(stored_ids) and browser.find_element(By.ID, "hit-ratio").text != "…")
    assert sorted(column(browser, 0)) == stored_ids
    assert browser.find_element(By.ID, "hit-ratio").text.endswith("%")

    # Sorted by hits: the page opens most-hit first; a click on the header turns it around.
    hits = lambda: [int(h) for h in column(browser, 4)]
    assert hits() == sorted(hits(), reverse=True)
    browser.find_element(By.CSS_SELECTOR, 'th[data-sort="hits"]').click()
    wait_for(lambda: hits() == sorted(hits()) and hits() != sorted(hits(), reverse=True))
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    browser.save_screenshot(str(ARTIFACTS / "admin-page.png"))

    # Searching narrows the list to one batch.
    browser.find_element(By.ID, "q").send_keys(FINISHED)
    wait_for(lambda: column(browser, 0) == [FINISHED])
    key = f"{FINISHED}_resultados.json"

    # Without the token a purge is refused in the page, and nothing is removed.
    rows(browser)[0].find_element(By.CSS_SELECTOR, "button.purge").click()
    wait_for(lambda: "admin token" in browser.find_element(By.ID, "message").text)
    assert get_json(f"{admin}/entries/{key}")[0] == 200
    # A wrong token: asked to confirm, refused by the server.
    browser.find_element(By.ID, "token").send_keys("not-the-token")
    browser.find_element(By.ID, "use-token").click()
    rows(browser)[0].find_element(By.CSS_SELECTOR, "button.purge").click()
    confirm(browser)
    wait_for(lambda: "refused (401)" in browser.find_element(By.ID, "message").text)
    assert get_json(f"{admin}/entries/{key}")[0] == 200
    # The token: confirmed, purged.
    browser.find_element(By.ID, "token").send_keys("e2e-admin-token")
    browser.find_element(By.ID, "use-token").click()
    assert browser.find_element(By.ID, "token").get_attribute("value") == "", "the field is cleared once used"
    rows(browser)[0].find_element(By.CSS_SELECTOR, "button.purge").click()
    confirm(browser)
    wait_for(lambda: "removed 1" in browser.find_element(By.ID, "message").text)
    assert get_json(f"{admin}/entries/{key}")[0] == 404
    wait_for(lambda: rows(browser) == [])
