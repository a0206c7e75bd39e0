"""The admin's analytics dashboard and campaign report in a real headless Chromium, after
notifications and a small campaign went through the real stack (Temporal, SMTP, chDB).

The charts must be drawn by the vendored Chart.js (a chart instance on each canvas), the
tables beside them must hold the right figures, an analyst reads both pages, and at 375 px
nothing scrolls sideways.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Awaitable, Callable

import httpx
from playwright.async_api import Page, expect
from sqlalchemy.ext.asyncio import AsyncEngine
from temporalio.client import Client

from api.app import create_app
from core.auth import Role
from core.config import Settings
from tests import admin_session
from tests.browser import test_admin_browser as admin_browser  # skips this module too without chromium
from tests.browser import test_admin_campaigns_browser as campaigns_browser
from tests.e2e.test_campaigns import wait_campaign
from tests.stack import SmtpServer

browser = admin_browser.browser
context = admin_browser.context
page = admin_browser.page
make_user = admin_browser.make_user
manager = campaigns_browser.manager
template_key = campaigns_browser.template_key

PHONE_WIDTH = 375
PIXEL = re.compile(r'src="(https?://[^"]+/t/o/[^"]+\.gif)"')
REFUSAL = "550 5.1.1 No such user"


def shot(name: str) -> str:
    return f"/tmp/admin-analytics-{name}.png"


async def drawn(page: Page, canvas: str) -> bool:
    """Did Chart.js draw a chart on this canvas (and is the library the one we serve)?"""
    return bool(await page.evaluate(
        "(id) => typeof Chart !== 'undefined' && Chart.getChart(document.getElementById(id)) !== undefined", canvas
    ))  # fmt: skip


async def figure(page: Page, selector: str) -> int:
    return int((await page.locator(selector).inner_text()).strip())


async def column(page: Page, selector: str) -> list[int]:
    return [int(text.strip()) for text in await page.locator(selector).all_inner_texts()]


async def reload_until(page: Page, url: str, settled: Callable[[], Awaitable[bool]], seconds: float = 20) -> None:
    """Reload `url` until `settled` (history rows are written asynchronously, in batches)."""
    for _ in range(int(seconds / 0.5)):
        await page.goto(url)
        if await settled():
            return
        await page.wait_for_timeout(500)
    raise AssertionError(f"{url} never showed the expected figures")


async def campaign_with_a_refusal(
    api: httpx.AsyncClient, manager: httpx.AsyncClient, template_key: str, smtp_server: SmtpServer, size: int
) -> tuple[str, list[str]]:
    """A completed email campaign to `size` new recipients, the last of whom the SMTP server refuses."""
    segment_id, _, emails = await campaigns_browser.audience(api, manager, size)
    smtp_server.handler.refuse[emails[-1]] = REFUSAL
    try:
        campaign = await campaigns_browser.draft(manager, template_key, segment_id)
        launched = await manager.post(f"/v1/campaigns/{campaign['id']}/launch")
        assert launched.status_code == 200, launched.text
        done = await wait_campaign(manager, campaign["id"], "completed", "failed", seconds=60)
    finally:
        del smtp_server.handler.refuse[emails[-1]]
    assert done["status"] == "completed", done
    return str(campaign["id"]), emails


async def open_pixel(api_url: str, smtp_server: SmtpServer, email: str) -> None:
    """Open the email as a mail client does: fetch its tracking pixel."""
    (message,) = smtp_server.handler.to(email)
    html = message.get_body(preferencelist=("html",)).get_content()
    (url,) = PIXEL.findall(html)
    async with httpx.AsyncClient(timeout=10) as public:
        assert (await public.get(url.replace("&amp;", "&"))).status_code == 200


async def test_dashboard_and_campaign_report_draw_their_charts_with_the_right_figures(
    page: Page,
    api_url: str,
    api: httpx.AsyncClient,
    manager: httpx.AsyncClient,
    template_key: str,
    recipient: dict,
    smtp_server: SmtpServer,
    make_user,
) -> None:
    await campaigns_browser.signed_in(page, api_url, make_user, Role.campaign_manager)
    today = f"{api_url}/admin/analytics?period=today"
    await page.goto(today)
    await expect(page.locator("#period-today")).to_have_attribute("aria-current", "page")
    sms_before = await figure(page, "#rates-table tr[data-channel=sms] [data-figure=sent]")
    email_before = await figure(page, "#rates-table tr[data-channel=email] [data-figure=sent]")
    failed_before = await figure(page, "#rates-table tr[data-channel=email] [data-figure=failed]")

    for n in range(3):
        await admin_browser.send_sms(api, recipient, f"Analytics {n}")
    campaign_id, emails = await campaign_with_a_refusal(api, manager, template_key, smtp_server, 4)
    await open_pixel(api_url, smtp_server, emails[0])

    async def dashboard_settled() -> bool:
        return (
            await figure(page, "#rates-table tr[data-channel=sms] [data-figure=sent]") == sms_before + 3
            and await figure(page, "#rates-table tr[data-channel=email] [data-figure=sent]") == email_before + 3
            and await figure(page, "#rates-table tr[data-channel=email] [data-figure=failed]") == failed_before + 1
        )

    await reload_until(page, today, dashboard_settled)
    assert await drawn(page, "chart-sends")
    assert await drawn(page, "chart-rates")
    # Today by the hour: the sends table adds up to the totals, and the last row is this hour.
    for channel in ("email", "sms", "push"):
        per_hour = await column(page, f"#sends-table td[data-channel={channel}]")
        assert sum(per_hour) == await figure(page, f"#rates-table tr[data-channel={channel}] [data-figure=sent]")
    assert await page.locator("#sends-table tbody tr").count() >= 1
    totals = page.locator("#rates-table tr[data-channel='all channels']")
    channel_sent = await column(page, "#rates-table tbody tr:not([data-channel='all channels']) [data-figure=sent]")
    assert int(await totals.locator("[data-figure=sent]").inner_text()) == sum(channel_sent)
    assert await figure(page, "#kpi-sent") == sum(channel_sent)
    # A rate and its denominator: opened / sent, as a percentage.
    sent = await figure(page, "#rates-table tr[data-channel=email] [data-figure=sent]")
    opened = await figure(page, "#rates-table tr[data-channel=email] [data-figure=opened]")
    open_rate = page.locator("#rates-table tr[data-channel=email] [data-figure=open_rate]")
    await expect(open_rate).to_have_text(f"{opened / sent * 100:.1f} %")
    await expect(page.locator("#chart-sends")).to_have_attribute("role", "img")
    await expect(page.locator("#sends-table caption")).to_contain_text("Sends per hour and channel")
    await page.screenshot(path=shot("dashboard"), full_page=True)

    # The switch: the last 7 days, by the day (seven rows, today last).
    await page.click("#period-7d")
    await page.wait_for_url(re.compile(r"period=7d"))
    await expect(page.locator("#sends-table tbody tr")).to_have_count(7)
    assert await drawn(page, "chart-sends")
    assert await drawn(page, "chart-rates")
    assert await figure(page, "#rates-table tr[data-channel=sms] [data-figure=sent]") >= sms_before + 3

    # The campaign report, from the campaign's own page.
    await page.goto(f"{api_url}/admin/campaigns/view/{campaign_id}")
    await page.click("#campaign-report")
    await page.wait_for_url(f"{api_url}/admin/analytics/campaigns/{campaign_id}")
    funnel = {"targeted": 4, "sent": 3, "opened": 1, "clicked": 0}

    async def report_settled() -> bool:
        return all([await figure(page, f"#funnel-table tr[data-step={step}] [data-figure=count]") == count
                    for step, count in funnel.items()])  # fmt: skip

    await reload_until(page, page.url, report_settled)
    assert await drawn(page, "chart-funnel")
    assert await drawn(page, "chart-timeline")
    await expect(page.locator("#funnel-table tr[data-step=sent] td").nth(1)).to_have_text("75.0 %")
    await expect(page.locator("#failures-table tbody tr")).to_have_count(1)
    await expect(page.locator("#failures-table tbody tr td")).to_have_text("1")
    assert sum(await column(page, "#timeline-table [data-figure=sent]")) == 3
    assert sum(await column(page, "#timeline-table [data-figure=failed]")) == 1
    await expect(page.locator("#chart-timeline")).to_have_attribute("aria-label", re.compile("per minute"))
    await page.screenshot(path=shot("campaign"), full_page=True)


async def test_an_analyst_reads_both_pages_and_they_fit_a_phone(
    page: Page,
    api_url: str,
    api: httpx.AsyncClient,
    manager: httpx.AsyncClient,
    template_key: str,
    smtp_server: SmtpServer,
    make_user,
) -> None:
    campaign_id, _ = await campaign_with_a_refusal(api, manager, template_key, smtp_server, 2)
    await page.set_viewport_size({"width": PHONE_WIDTH, "height": 800})
    await campaigns_browser.signed_in(page, api_url, make_user, Role.analyst)

    for name, url, canvases in (
        ("dashboard-375", f"{api_url}/admin/analytics?period=30d", ("chart-sends", "chart-rates")),
        ("campaign-375", f"{api_url}/admin/analytics/campaigns/{campaign_id}", ("chart-funnel", "chart-timeline")),
    ):
        response = await page.goto(url)
        assert response is not None
        assert response.status == 200, name
        for canvas in canvases:
            assert await drawn(page, canvas), (name, canvas)
        # Nothing here changes anything: no form posts, whatever the role.
        await expect(page.locator("form[method=post]")).to_have_count(0)
        width = await page.evaluate("document.documentElement.scrollWidth")
        assert width <= PHONE_WIDTH, (name, width)
        await page.screenshot(path=shot(name), full_page=True)

    # The menu has it (behind the collapsed navigation at this width).
    await page.goto(f"{api_url}/admin/")
    await expect(page.locator("a.nav-link", has_text="Analytics")).to_have_count(1)


async def test_the_vendored_chart_library_is_served_by_the_admin_itself(api_url: str) -> None:
    async with httpx.AsyncClient(base_url=api_url, timeout=10) as client:
        response = await client.get("/admin/statics/vendor/chartjs/chart.umd.min.js")
    assert response.status_code == 200
    assert "javascript" in response.headers["content-type"]
    assert response.text.startswith("/*!\n * Chart.js v4.")


async def test_an_unknown_period_says_so_and_shows_seven_days(page: Page, api_url: str, make_user) -> None:
    await campaigns_browser.signed_in(page, api_url, make_user, Role.campaign_manager)
    response = await page.goto(f"{api_url}/admin/analytics?period=week")
    assert response is not None
    assert response.status == 400
    await expect(page.locator("#form-problems")).to_contain_text("choose one of today, 7d, 30d")
    await expect(page.locator("#period-7d")).to_have_attribute("aria-current", "page")


async def test_without_a_history_reader_the_pages_say_what_analytics_needs(
    settings: Settings, engine: AsyncEngine, temporal_client: Client, make_user
) -> None:
    """A separate API process without MARQUEE_CLICKHOUSE_URL has no history reader (chDB is the worker's)."""
    assert settings.clickhouse_url is None
    app = create_app(settings, engine=engine, temporal=temporal_client)
    assert app.state.history is None
    email, password = await make_user(Role.analyst)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://admin.test") as client:
        signed, _ = await admin_session.sign_in(client, email, password)
        assert signed.status_code == 302, signed.text
        for url in ("/admin/analytics", f"/admin/analytics/campaigns/{uuid.uuid4()}"):
            response = await client.get(url)
            assert response.status_code == 503, url
            assert "Analytics needs ClickHouse (MARQUEE_CLICKHOUSE_URL) in a separate API process." in response.text
            assert "chart.umd.min.js" not in response.text
