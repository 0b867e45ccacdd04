//! `wgtrace run`: trace until told to stop, refreshing the view each
//! interval, then print the final report.

use std::{
    io::{IsTerminal as _, Write as _},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result};
use tokio::signal::unix::{SignalKind, signal};

use crate::{
    correlation::{self, Observations},
    probes::{Event, Tracer},
    report::{self, Report, RouteLookups},
    topology::{Scope, Topology},
};

pub struct RunOptions {
    pub duration: Option<Duration>,
    pub interval: Duration,
    pub json: bool,
    pub scope: Scope,
}

pub async fn run(options: RunOptions) -> Result<()> {
    let started = Instant::now();
    let mut tracer = Tracer::start()?;
    for hook in &tracer.hooks {
        log::info!("hook {}: {}", hook.name, if hook.active { "active" } else { "inactive" });
    }
    let live = !options.json && std::io::stderr().is_terminal();
    let mut sigterm = signal(SignalKind::terminate()).context("installing a SIGTERM handler")?;
    let mut ticker = tokio::time::interval(options.interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let deadline = options.duration.map(|d| tokio::time::Instant::now() + d);
    loop {
        tokio::select! {
            _ = ticker.tick() => {
                handle_events(tracer.drain_events());
                if live {
                    let report = build_report(&tracer, &options.scope, started)?;
                    let mut err = std::io::stderr().lock();
                    // Clear the screen and redraw from the top.
                    let _ = write!(err, "\x1b[H\x1b[2J{}", report::render(&report, &tracer.hooks));
                }
            }
            _ = tokio::signal::ctrl_c() => break,
            _ = sigterm.recv() => break,
            _ = async { match deadline { Some(d) => tokio::time::sleep_until(d).await, None => std::future::pending().await } } => break,
        }
    }
    handle_events(tracer.drain_events());
    let report = build_report(&tracer, &options.scope, started)?;
    if options.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{}", report::render(&report, &tracer.hooks));
    }
    Ok(())
}

fn handle_events(events: Vec<Event>) {
    for event in events {
        match event {
            Event::Packet(p) => log::debug!(
                "netns {} if {} {}: WireGuard type {} {}:{} -> {}:{} mark {:#x}",
                p.key.netns,
                p.key.ifindex,
                String::from_utf8_lossy(&p.ifname).trim_end_matches('\0'),
                p.message_type,
                p.key.family,
                p.key.sport,
                p.key.family,
                p.key.dport,
                p.key.mark
            ),
            Event::Route(r) => log::debug!(
                "netns {} route lookup mark {:#x} table {} -> if {} (error {})",
                r.key.netns,
                r.key.mark,
                r.key.table,
                r.result_ifindex,
                r.error
            ),
        }
    }
}

fn build_report(tracer: &Tracer, scope: &Scope, started: Instant) -> Result<Report> {
    let topology = Topology::discover(scope)?;
    let flows = tracer.flows()?;
    let routes = tracer.routes()?;
    let tunnels = correlation::correlate(&topology, &Observations { flows: &flows, routes: &routes }, &topology);
    let route_lookups = correlation::lookups_by_mark_and_table(&routes)
        .into_iter()
        .map(|(mark, table, lookups)| RouteLookups { mark, table, lookups })
        .collect();
    Ok(Report {
        tunnels,
        events_lost: tracer.events_lost()?,
        route_lookups,
        duration_seconds: started.elapsed().as_secs_f64(),
    })
}
