"""Re-make the README's dashboard screenshot: the Dask dashboard while blockals trains.

Needs the 'docs' extra (Playwright) and a Chromium binary (Debian: ``apt-get install
chromium``; Playwright downloads no browser here). Trains a synthetic set on a
LocalCluster whose dashboard listens on 127.0.0.1, opens its status page in headless
Chromium a few iterations in, and writes ``docs/images/dashboard.png``.

    python docs/screenshots.py [--chromium /usr/bin/chromium]
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import threading
import time
from pathlib import Path

IMAGE = Path(__file__).resolve().parent / "images" / "dashboard.png"


def main() -> None:
    from distributed import Client, LocalCluster
    from playwright.sync_api import sync_playwright

    import blockals

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--chromium", default=shutil.which("chromium") or "/usr/bin/chromium")
    args = p.parse_args()
    IMAGE.parent.mkdir(exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp, LocalCluster(
        n_workers=2, threads_per_worker=1, host="127.0.0.1", dashboard_address="127.0.0.1:0"
    ) as cluster, Client(cluster) as client:
        store = blockals.datasets.make_store(f"{tmp}/r.zarr", n_users=20_000, n_items=6_000, n_ratings=2_000_000,
                                             n_user_blocks=8, n_item_blocks=6)
        training = threading.Thread(target=blockals.ALS(rank=48, max_iter=15, reg=0.05).fit, args=(store, client))
        training.start()
        time.sleep(5)  # a few iterations in: the task stream shows every stage
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=args.chromium, args=[
                "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                "--disable-sync", "--no-first-run"])
            page = browser.new_page(viewport={"width": 1400, "height": 900})
            page.goto(client.dashboard_link)
            page.wait_for_timeout(5000)  # the plots arrive over a websocket after the page loads
            page.screenshot(path=str(IMAGE))
            browser.close()
        training.join()
    print(f"wrote {IMAGE}")


if __name__ == "__main__":
    main()
