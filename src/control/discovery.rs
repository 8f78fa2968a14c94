//! DNS discovery for endpoints named by a DNS name: resolved, then re-resolved as each answer's TTL runs out.
//!
//! Each named endpoint gets one background task ([`Discovery::watch`]) that resolves the
//! name, publishes the address set on a `tokio::sync::watch` channel and re-resolves when
//! the answer's TTL runs out (clamped to [`TtlBounds`]). Consumers turn every published
//! set into endpoints and rebuild the routing table, so resolution never runs on the
//! request path. A failed lookup keeps the last good set: a DNS outage must not empty a
//! cluster whose backends are still up.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use hickory_resolver::config::{
    LookupIpStrategy, NameServerConfig, ResolveHosts, ResolverConfig, ResolverOpts,
};
use hickory_resolver::name_server::TokioConnectionProvider;
use hickory_resolver::proto::xfer::Protocol;
use hickory_resolver::{ResolverBuilder, TokioResolver};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tracing::{debug, info, warn};

/// Where re-resolution is scheduled: the answer's TTL clamped to `min..=max`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TtlBounds {
    pub min: Duration,
    pub max: Duration,
}

impl Default for TtlBounds {
    fn default() -> Self {
        TtlBounds {
            min: Duration::from_secs(1),
            max: Duration::from_secs(300),
        }
    }
}

/// What to resolve.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Target {
    /// A and AAAA records of `name`, each address with `port`. An IP literal needs no DNS.
    Host { name: String, port: u16 },
    /// SRV records of `name` (e.g. `_http._tcp.api.default.svc`); each target's addresses
    /// with the record's port.
    Srv { name: String },
}

impl Target {
    pub fn name(&self) -> &str {
        match self {
            Target::Host { name, .. } | Target::Srv { name } => name,
        }
    }

    fn ip_literal(&self) -> Option<SocketAddr> {
        match self {
            Target::Host { name, port } => {
                let bare = name.trim_start_matches('[').trim_end_matches(']');
                bare.parse::<IpAddr>()
                    .ok()
                    .map(|ip| SocketAddr::new(ip, *port))
            }
            Target::Srv { .. } => None,
        }
    }
}

/// Called after every lookup with the name and whether it succeeded (for metrics).
pub type OnResult = Arc<dyn Fn(&str, bool) + Send + Sync>;

/// A shared resolver; cheap to clone (hickory's resolver is reference-counted inside).
#[derive(Clone)]
pub struct Discovery {
    resolver: TokioResolver,
}

impl Discovery {
    /// Resolver from /etc/resolv.conf, with /etc/hosts honoured. If resolv.conf cannot be
    /// read we fall back to 127.0.0.1:53, which is what the C library does without the
    /// file; hickory's own default (Google's public servers) would send internal names
    /// off the host. A file that is readable but unusable is an error, not a fallback.
    pub fn from_system() -> Result<Discovery, String> {
        const RESOLV_CONF: &str = "/etc/resolv.conf";
        let builder = match std::fs::read(RESOLV_CONF) {
            Ok(_) => TokioResolver::builder_tokio().map_err(|e| format!("{RESOLV_CONF}: {e}"))?,
            Err(e) => {
                warn!(error = %e, "cannot read {RESOLV_CONF}; using nameserver 127.0.0.1:53 and /etc/hosts");
                let ns: SocketAddr = ([127, 0, 0, 1], 53).into();
                let mut config = ResolverConfig::new();
                config.add_name_server(NameServerConfig::new(ns, Protocol::Udp));
                config.add_name_server(NameServerConfig::new(ns, Protocol::Tcp));
                TokioResolver::builder_with_config(config, TokioConnectionProvider::default())
            }
        };
        Ok(Self::build(builder, |o| {
            o.use_hosts_file = ResolveHosts::Always
        }))
    }

    /// Resolver asking one UDP nameserver and nothing else (no hosts file): config
    /// `[dns] nameserver`, for tests and split-horizon setups. Short timeout and a single
    /// attempt so failures show up quickly; the watch loop retries with back-off.
    pub fn with_nameserver(addr: SocketAddr) -> Discovery {
        let mut config = ResolverConfig::new();
        config.add_name_server(NameServerConfig::new(addr, Protocol::Udp));
        let builder =
            TokioResolver::builder_with_config(config, TokioConnectionProvider::default());
        Self::build(builder, |o| {
            o.use_hosts_file = ResolveHosts::Never;
            o.timeout = Duration::from_millis(500);
            o.attempts = 1;
        })
    }

    fn build(
        mut builder: ResolverBuilder<TokioConnectionProvider>,
        tweak: impl FnOnce(&mut ResolverOpts),
    ) -> Discovery {
        let opts = builder.options_mut();
        // Both families: the default (IPv4, then IPv6 only if there is no A record) would
        // silently drop AAAA backends of dual-stack names.
        opts.ip_strategy = LookupIpStrategy::Ipv4AndIpv6;
        // No cache: each watch task is the cache for its name and already waits the TTL.
        // hickory's cache would keep an answer for its full TTL even when bounds.max is
        // shorter, hiding a change we were asked to pick up; and resolve_once must see
        // the wire. TTLs still come through (Lookup::valid_until).
        opts.cache_size = 0;
        tweak(opts);
        Discovery {
            resolver: builder.build(),
        }
    }

    /// Resolve `target` once: the sorted, de-duplicated addresses and the time until the
    /// answer expires (the smallest TTL involved). An empty answer is an error, so a
    /// caller keeping "the last good set" never replaces it with nothing.
    pub async fn resolve_once(
        &self,
        target: &Target,
    ) -> Result<(Vec<SocketAddr>, Duration), String> {
        if let Some(addr) = target.ip_literal() {
            return Ok((vec![addr], Duration::MAX));
        }
        let (mut addrs, valid_until) = match target {
            Target::Host { name, port } => {
                let ips = self
                    .resolver
                    .lookup_ip(name.as_str())
                    .await
                    .map_err(|e| e.to_string())?;
                let addrs: Vec<_> = ips.iter().map(|ip| SocketAddr::new(ip, *port)).collect();
                (addrs, ips.valid_until())
            }
            Target::Srv { name } => {
                let srv = self
                    .resolver
                    .srv_lookup(name.as_str())
                    .await
                    .map_err(|e| e.to_string())?;
                let mut valid_until = srv.as_lookup().valid_until();
                let mut addrs = Vec::new();
                // SRV sets are small; resolving targets one by one keeps this simple.
                // Priority and weight are ignored: the balancer picks by health and latency.
                for rec in srv.iter() {
                    if rec.target().is_root() {
                        continue; // "." means "no service here" (RFC 2782)
                    }
                    match self.resolver.lookup_ip(rec.target().clone()).await {
                        Ok(ips) => {
                            valid_until = valid_until.min(ips.valid_until());
                            addrs.extend(ips.iter().map(|ip| SocketAddr::new(ip, rec.port())));
                        }
                        // A target that authoritatively has no address is skipped, so one
                        // stale SRV record cannot block updates for the others forever.
                        Err(e) if e.is_no_records_found() || e.is_nx_domain() => {
                            debug!(target = %rec.target(), error = %e, "SRV target has no address")
                        }
                        // Anything else (timeout, SERVFAIL) fails the round: a partial
                        // answer would drop endpoints just because DNS hiccupped.
                        Err(e) => return Err(format!("SRV target {}: {e}", rec.target())),
                    }
                }
                (addrs, valid_until)
            }
        };
        addrs.sort();
        addrs.dedup();
        if addrs.is_empty() {
            return Err("no addresses in answer".to_string());
        }
        Ok((addrs, valid_until.saturating_duration_since(Instant::now())))
    }

    /// Keep `target` resolved in a background task. The receiver starts empty; every
    /// changed set is published (sorted, de-duplicated, never empty). The task ends when
    /// every receiver is dropped, or at once after publishing an IP literal.
    pub fn watch(
        &self,
        target: Target,
        bounds: TtlBounds,
        on_result: OnResult,
    ) -> (watch::Receiver<Arc<Vec<SocketAddr>>>, JoinHandle<()>) {
        let (tx, rx) = watch::channel(Arc::new(Vec::new()));
        let this = self.clone();
        // A floor on min: with min 0 a TTL-0 answer would turn into a busy loop against
        // the nameserver. max below min would make clamp() panic.
        let min = bounds.min.max(Duration::from_millis(100));
        let max = bounds.max.max(min);
        let handle = tokio::spawn(async move {
            if let Some(addr) = target.ip_literal() {
                tx.send_replace(Arc::new(vec![addr]));
                return;
            }
            let name = target.name().to_string();
            let mut backoff = min;
            loop {
                let result = tokio::select! {
                    r = this.resolve_once(&target) => r,
                    _ = tx.closed() => return,
                };
                let wait = match result {
                    Ok((addrs, ttl)) => {
                        backoff = min;
                        tx.send_if_modified(|cur| {
                            if **cur == addrs {
                                return false;
                            }
                            info!(name = %name, addresses = ?addrs, "DNS answer changed");
                            *cur = Arc::new(addrs);
                            true
                        });
                        on_result(&name, true);
                        ttl.clamp(min, max)
                    }
                    Err(e) => {
                        warn!(name = %name, error = %e, "DNS lookup failed; keeping last addresses");
                        on_result(&name, false);
                        // Back off so a dead nameserver is not hammered, but never wait
                        // longer than a healthy answer could have lived.
                        let wait = backoff.min(max);
                        backoff = backoff.saturating_mul(2);
                        wait
                    }
                };
                tokio::select! {
                    _ = tokio::time::sleep(wait) => {}
                    _ = tx.closed() => return,
                }
            }
        });
        (rx, handle)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hickory_resolver::proto::op::{Message, MessageType, ResponseCode};
    use hickory_resolver::proto::rr::rdata::{A, SRV};
    use hickory_resolver::proto::rr::{Name, RData, Record, RecordType};
    use std::net::{Ipv4Addr, Ipv6Addr};
    use std::sync::atomic::{AtomicBool, AtomicU32, AtomicUsize, Ordering};
    use std::sync::Mutex;
    use tokio::net::UdpSocket;
    use tokio::sync::mpsc;
    use tokio::time::timeout;

    /// A few lines of authoritative DNS on 127.0.0.1:<random>/udp:
    /// `api.test.` A = `a` (changeable), AAAA = no data; `_http._tcp.api.test.` SRV =
    /// a.api.test.:8081 and b.api.test.:8082; `a.api.test.` = 127.0.0.4,
    /// `b.api.test.` = 127.0.0.5; anything else NXDOMAIN.
    struct TestDns {
        addr: SocketAddr,
        a: Arc<Mutex<Vec<Ipv4Addr>>>,
        ttl: Arc<AtomicU32>,
        servfail: Arc<AtomicBool>,
        queries: Arc<AtomicUsize>,       // every query received
        api_a_queries: Arc<AtomicUsize>, // A queries for api.test.
        task: JoinHandle<()>,
    }

    impl TestDns {
        async fn start(a: &[Ipv4Addr], ttl: u32) -> TestDns {
            let sock = UdpSocket::bind("127.0.0.1:0").await.unwrap();
            let dns = TestDns {
                addr: sock.local_addr().unwrap(),
                a: Arc::new(Mutex::new(a.to_vec())),
                ttl: Arc::new(AtomicU32::new(ttl)),
                servfail: Arc::new(AtomicBool::new(false)),
                queries: Arc::new(AtomicUsize::new(0)),
                api_a_queries: Arc::new(AtomicUsize::new(0)),
                task: tokio::spawn(async {}),
            };
            let (a, ttl, servfail, queries, api_a) = (
                dns.a.clone(),
                dns.ttl.clone(),
                dns.servfail.clone(),
                dns.queries.clone(),
                dns.api_a_queries.clone(),
            );
            let task = tokio::spawn(async move {
                let mut buf = [0u8; 1500];
                loop {
                    let Ok((n, peer)) = sock.recv_from(&mut buf).await else {
                        continue;
                    };
                    let Ok(req) = Message::from_vec(&buf[..n]) else {
                        continue;
                    };
                    queries.fetch_add(1, Ordering::SeqCst);
                    let mut resp = Message::new();
                    resp.set_id(req.id())
                        .set_message_type(MessageType::Response)
                        .set_op_code(req.op_code())
                        .set_recursion_desired(req.recursion_desired())
                        .set_recursion_available(true)
                        .set_authoritative(true);
                    let Some(q) = req.queries().first().cloned() else {
                        continue;
                    };
                    resp.add_query(q.clone());
                    let qname = q.name().to_ascii().to_ascii_lowercase();
                    let ttl = ttl.load(Ordering::SeqCst);
                    let rec =
                        |ip: Ipv4Addr| Record::from_rdata(q.name().clone(), ttl, RData::A(A(ip)));
                    if qname == "api.test." && q.query_type() == RecordType::A {
                        api_a.fetch_add(1, Ordering::SeqCst);
                    }
                    if servfail.load(Ordering::SeqCst) {
                        resp.set_response_code(ResponseCode::ServFail);
                    } else {
                        match (qname.as_str(), q.query_type()) {
                            ("api.test.", RecordType::A) => {
                                for ip in a.lock().unwrap().iter() {
                                    resp.add_answer(rec(*ip));
                                }
                            }
                            ("dual.test.", RecordType::A) => {
                                resp.add_answer(rec(Ipv4Addr::new(127, 0, 0, 1)));
                            }
                            ("dual.test.", RecordType::AAAA) => {
                                resp.add_answer(Record::from_rdata(
                                    q.name().clone(),
                                    ttl,
                                    RData::AAAA(Ipv6Addr::LOCALHOST.into()),
                                ));
                            }
                            ("a.api.test.", RecordType::A) => {
                                resp.add_answer(rec(Ipv4Addr::new(127, 0, 0, 4)));
                            }
                            ("b.api.test.", RecordType::A) => {
                                resp.add_answer(rec(Ipv4Addr::new(127, 0, 0, 5)));
                            }
                            ("_http._tcp.api.test.", RecordType::SRV) => {
                                for (t, port) in [("a.api.test.", 8081), ("b.api.test.", 8082)] {
                                    let srv = SRV::new(0, 10, port, Name::from_ascii(t).unwrap());
                                    resp.add_answer(Record::from_rdata(
                                        q.name().clone(),
                                        ttl,
                                        RData::SRV(srv),
                                    ));
                                }
                            }
                            (
                                "api.test."
                                | "a.api.test."
                                | "b.api.test."
                                | "_http._tcp.api.test.",
                                _,
                            ) => {} // no data
                            _ => {
                                resp.set_response_code(ResponseCode::NXDomain);
                            }
                        }
                    }
                    let _ = sock.send_to(&resp.to_vec().unwrap(), peer).await;
                }
            });
            TestDns { task, ..dns }
        }

        fn set_a(&self, ips: &[Ipv4Addr]) {
            *self.a.lock().unwrap() = ips.to_vec();
        }
    }

    fn sa(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    fn host(name: &str, port: u16) -> Target {
        Target::Host {
            name: name.into(),
            port,
        }
    }

    /// on_result that forwards every report into a channel the test can wait on.
    fn reporter() -> (OnResult, mpsc::UnboundedReceiver<(String, bool)>) {
        let (tx, rx) = mpsc::unbounded_channel();
        (
            Arc::new(move |name: &str, ok| {
                let _ = tx.send((name.to_string(), ok));
            }),
            rx,
        )
    }

    async fn wait_report(rx: &mut mpsc::UnboundedReceiver<(String, bool)>, ok: bool) -> String {
        timeout(Duration::from_secs(5), async {
            loop {
                let (name, got) = rx.recv().await.expect("reporter closed");
                if got == ok {
                    return name;
                }
            }
        })
        .await
        .unwrap_or_else(|_| panic!("no on_result(_, {ok}) within 5 s"))
    }

    async fn wait_set(rx: &mut watch::Receiver<Arc<Vec<SocketAddr>>>, want: &[SocketAddr]) {
        let r = timeout(
            Duration::from_secs(5),
            rx.wait_for(|v| v.as_slice() == want),
        )
        .await
        .map(|res| res.is_ok());
        assert!(r.is_ok(), "wanted {want:?}, have {:?}", *rx.borrow());
        assert!(r.unwrap(), "watch task ended before publishing {want:?}");
    }

    const FAST: TtlBounds = TtlBounds {
        min: Duration::from_millis(200),
        max: Duration::from_secs(2),
    };

    #[tokio::test]
    async fn watch_follows_changing_answer() {
        let dns = TestDns::start(&[Ipv4Addr::new(127, 0, 0, 1)], 1).await;
        let disc = Discovery::with_nameserver(dns.addr);
        let (report, mut reports) = reporter();
        let (mut rx, task) = disc.watch(host("api.test", 8080), TtlBounds::default(), report);
        wait_set(&mut rx, &[sa("127.0.0.1:8080")]).await;
        assert_eq!(wait_report(&mut reports, true).await, "api.test");

        // Duplicates in the answer collapse; order is normalised.
        dns.set_a(&[
            Ipv4Addr::new(127, 0, 0, 3),
            Ipv4Addr::new(127, 0, 0, 2),
            Ipv4Addr::new(127, 0, 0, 3),
        ]);
        wait_set(&mut rx, &[sa("127.0.0.2:8080"), sa("127.0.0.3:8080")]).await;

        // The task ends once the last receiver is gone.
        drop(rx);
        timeout(Duration::from_secs(3), task)
            .await
            .expect("task did not stop")
            .unwrap();
    }

    #[tokio::test]
    async fn ttl_above_max_is_clamped_and_not_cached() {
        // TTL 3600 but bounds.max 1 s: the change must show within a few seconds, which
        // fails if a resolver cache keeps serving the hour-long answer.
        let dns = TestDns::start(&[Ipv4Addr::new(127, 0, 0, 1)], 3600).await;
        let disc = Discovery::with_nameserver(dns.addr);
        let (report, _reports) = reporter();
        let bounds = TtlBounds {
            min: Duration::from_millis(200),
            max: Duration::from_secs(1),
        };
        let (mut rx, _task) = disc.watch(host("api.test", 8080), bounds, report);
        wait_set(&mut rx, &[sa("127.0.0.1:8080")]).await;
        dns.set_a(&[Ipv4Addr::new(127, 0, 0, 2)]);
        wait_set(&mut rx, &[sa("127.0.0.2:8080")]).await;
    }

    #[tokio::test]
    async fn host_gets_both_families() {
        let dns = TestDns::start(&[], 1).await;
        let disc = Discovery::with_nameserver(dns.addr);
        let (addrs, _) = disc.resolve_once(&host("dual.test", 443)).await.unwrap();
        assert_eq!(addrs, vec![sa("127.0.0.1:443"), sa("[::1]:443")]);
    }

    #[tokio::test]
    async fn outage_keeps_last_addresses() {
        let dns = TestDns::start(&[Ipv4Addr::new(127, 0, 0, 1)], 1).await;
        let disc = Discovery::with_nameserver(dns.addr);
        let (report, mut reports) = reporter();
        let (mut rx, _task) = disc.watch(host("api.test", 8080), FAST, report);
        wait_set(&mut rx, &[sa("127.0.0.1:8080")]).await;

        // SERVFAIL: reported as failure, the set stays, nothing empty is published.
        dns.servfail.store(true, Ordering::SeqCst);
        assert_eq!(wait_report(&mut reports, false).await, "api.test");
        wait_report(&mut reports, false).await; // a retry also fails
        assert_eq!(**rx.borrow_and_update(), vec![sa("127.0.0.1:8080")]);
        assert!(
            !rx.has_changed().unwrap(),
            "something was published during the outage"
        );

        // Recovery with a new answer is picked up by the retry loop.
        dns.set_a(&[Ipv4Addr::new(127, 0, 0, 9)]);
        dns.servfail.store(false, Ordering::SeqCst);
        wait_set(&mut rx, &[sa("127.0.0.9:8080")]).await;

        // Server gone entirely (socket closed): same behaviour.
        dns.task.abort();
        while reports.try_recv().is_ok() {}
        wait_report(&mut reports, false).await;
        wait_report(&mut reports, false).await;
        assert_eq!(**rx.borrow_and_update(), vec![sa("127.0.0.9:8080")]);
        assert!(!rx.has_changed().unwrap());
    }

    #[tokio::test]
    async fn srv_targets_with_their_ports() {
        let dns = TestDns::start(&[], 30).await;
        let disc = Discovery::with_nameserver(dns.addr);
        let srv = Target::Srv {
            name: "_http._tcp.api.test.".into(),
        };
        let (addrs, ttl) = disc.resolve_once(&srv).await.unwrap();
        assert_eq!(addrs, vec![sa("127.0.0.4:8081"), sa("127.0.0.5:8082")]);
        assert!(
            ttl <= Duration::from_secs(30) && ttl >= Duration::from_secs(28),
            "ttl {ttl:?}"
        );

        let (report, _reports) = reporter();
        let (mut rx, task) = disc.watch(srv, TtlBounds::default(), report);
        wait_set(&mut rx, &[sa("127.0.0.4:8081"), sa("127.0.0.5:8082")]).await;
        // The task is now sleeping out a 30 s TTL; dropping the receiver must end it.
        drop(rx);
        timeout(Duration::from_secs(1), task)
            .await
            .expect("task outlived its receivers")
            .unwrap();
    }

    #[tokio::test]
    async fn empty_answer_and_nxdomain_are_errors() {
        let dns = TestDns::start(&[], 1).await;
        let disc = Discovery::with_nameserver(dns.addr);
        assert!(disc.resolve_once(&host("api.test", 80)).await.is_err());
        assert!(disc.resolve_once(&host("nope.test", 80)).await.is_err());
    }

    #[tokio::test]
    async fn ip_literal_needs_no_dns() {
        let dns = TestDns::start(&[Ipv4Addr::new(127, 0, 0, 1)], 1).await;
        let disc = Discovery::with_nameserver(dns.addr);
        let (report, mut reports) = reporter();
        for (name, want) in [
            ("127.0.0.7", "127.0.0.7:9000"),
            ("::1", "[::1]:9000"),
            ("[::1]", "[::1]:9000"),
        ] {
            let (mut rx, task) = disc.watch(host(name, 9000), TtlBounds::default(), report.clone());
            wait_set(&mut rx, &[sa(want)]).await;
            timeout(Duration::from_secs(1), task)
                .await
                .expect("literal task did not finish")
                .unwrap();
        }
        assert_eq!(
            disc.resolve_once(&host("127.0.0.7", 1)).await.unwrap().0,
            vec![sa("127.0.0.7:1")]
        );
        assert_eq!(
            dns.queries.load(Ordering::SeqCst),
            0,
            "IP literal caused DNS traffic"
        );
        assert!(
            reports.try_recv().is_err(),
            "on_result called without a lookup"
        );
    }

    #[tokio::test]
    async fn ttl_zero_is_clamped_to_min() {
        let dns = TestDns::start(&[Ipv4Addr::new(127, 0, 0, 1)], 0).await;
        let disc = Discovery::with_nameserver(dns.addr);
        let (report, _reports) = reporter();
        let bounds = TtlBounds {
            min: Duration::from_secs(1),
            max: Duration::from_secs(300),
        };
        let (mut rx, _task) = disc.watch(host("api.test", 8080), bounds, report);
        wait_set(&mut rx, &[sa("127.0.0.1:8080")]).await;
        let start = dns.api_a_queries.load(Ordering::SeqCst);
        tokio::time::sleep(Duration::from_secs(3)).await; // measurement window, not a wait for a result
        let n = dns.api_a_queries.load(Ordering::SeqCst) - start;
        // Rounds at about +1 s, +2 s, +3 s; without the clamp TTL 0 would mean hundreds.
        assert!((2..=4).contains(&n), "{n} A queries in 3 s");
    }

    #[tokio::test]
    async fn from_system_builds() {
        // Construction only: a lookup could send traffic to a non-loopback nameserver.
        assert!(Discovery::from_system().is_ok());
    }
}
