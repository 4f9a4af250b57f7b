//! The per-webhook chart of deliveries by outcome over the last hours, as an
//! inline SVG: drawn on the server, so the page needs no script, and with a
//! text alternative, so a screen reader gets the same figures.

use aegis_webhook_storage::deliveries::HourOfDeliveries;
use maud::{Markup, html};

const WIDTH: u32 = 720;
const HEIGHT: u32 = 160;
const AXIS: u32 = 20;

/// Stacked bars, one per hour: succeeded, failed, pending.
pub fn deliveries_by_hour(hours: &[HourOfDeliveries]) -> Markup {
    let most = hours
        .iter()
        .map(|hour| hour.succeeded + hour.failed + hour.pending)
        .max()
        .unwrap_or(0)
        .max(1);
    let total = |pick: fn(&HourOfDeliveries) -> u64| hours.iter().map(pick).sum::<u64>();
    let summary = format!(
        "Deliveries per hour over the last {} hours: {} succeeded, {} failed, {} pending; the busiest hour had {}.",
        hours.len(),
        total(|hour| hour.succeeded),
        total(|hour| hour.failed),
        total(|hour| hour.pending),
        most,
    );
    let slot = WIDTH / u32::try_from(hours.len().max(1)).unwrap_or(1);
    let plot = HEIGHT - AXIS;
    html! {
        svg class="chart" viewBox=(format!("0 0 {WIDTH} {HEIGHT}")) role="img" aria-label=(summary) {
            title { (summary) }
            @for (index, hour) in hours.iter().enumerate() {
                @let x = u32::try_from(index).unwrap_or(0) * slot + 2;
                @let bars = stack(hour, most, plot);
                g {
                    title {
                        (hour.hour_start.format("%H:00 UTC")) ": "
                        (hour.succeeded) " succeeded, " (hour.failed) " failed, " (hour.pending) " pending"
                    }
                    @for (class, y, height) in bars {
                        rect class=(class) x=(x) y=(y) width=(slot.saturating_sub(4)) height=(height) {}
                    }
                }
                @if index % 6 == 0 {
                    text x=(x) y=(HEIGHT - 4) class="axis" { (hour.hour_start.format("%H:00")) }
                }
            }
            line x1="0" y1=(plot) x2=(WIDTH) y2=(plot) class="baseline" {}
        }
    }
}

/// The bars of one hour, bottom up: (class, y, height) in the plot's units.
fn stack(hour: &HourOfDeliveries, most: u64, plot: u32) -> Vec<(&'static str, u64, u64)> {
    let scale = |count: u64| count * u64::from(plot) / most;
    let mut top = u64::from(plot);
    let mut bars = Vec::new();
    for (class, count) in [
        ("succeeded", hour.succeeded),
        ("failed", hour.failed),
        ("pending", hour.pending),
    ] {
        let height = scale(count);
        if count > 0 {
            // A non-empty part is at least one unit high: never invisible.
            let height = height.max(1);
            top = top.saturating_sub(height);
            bars.push((class, top, height));
        }
    }
    bars
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::{TimeZone as _, Utc};

    fn hour(succeeded: u64, failed: u64, pending: u64) -> HourOfDeliveries {
        HourOfDeliveries {
            hour_start: Utc.with_ymd_and_hms(2026, 12, 3, 10, 0, 0).single().expect("valid"),
            succeeded,
            failed,
            pending,
        }
    }

    #[test]
    fn the_busiest_hour_fills_the_plot_and_parts_stack_bottom_up() {
        let bars = stack(&hour(60, 30, 10), 100, 140);
        assert_eq!(
            bars,
            vec![("succeeded", 56, 84), ("failed", 14, 42), ("pending", 0, 14)]
        );
    }

    #[test]
    fn a_single_failure_beside_a_busy_hour_still_shows() {
        assert_eq!(stack(&hour(0, 1, 0), 10_000, 140), vec![("failed", 139, 1)]);
        assert!(stack(&hour(0, 0, 0), 10, 140).is_empty());
    }

    #[test]
    fn the_text_alternative_gives_the_totals() {
        let svg = deliveries_by_hour(&[hour(5, 1, 0), hour(2, 0, 3)]).into_string();
        assert!(
            svg.contains("7 succeeded, 1 failed, 3 pending; the busiest hour had 6."),
            "{svg}"
        );
        assert!(svg.contains("role=\"img\""), "{svg}");
    }
}
