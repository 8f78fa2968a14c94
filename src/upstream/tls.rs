//! TLS for edge-router: terminating TLS on the listener (rustls, SNI, ALPN h2 + http/1.1,
//! hot reload) and the HTTPS connector used for upstream clusters and their health probes.
//!
//! The ring provider is passed explicitly everywhere, so nothing depends on which crypto
//! provider happens to be installed as the process default (or on two being compiled in).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use hyper_rustls::{
    DefaultServerNameResolver, FixedServerNameResolver, HttpsConnector, ResolveServerName,
};
use hyper_util::client::legacy::connect::HttpConnector;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls::{ClientConfig, RootCertStore, ServerConfig, SupportedProtocolVersion};

/// TLS 1.2 and 1.3 only (rustls has nothing older, but say it rather than rely on defaults).
static VERSIONS: &[&SupportedProtocolVersion] = &[&rustls::version::TLS13, &rustls::version::TLS12];

/// One certificate chain (PEM, leaf first) and its private key (PEM: PKCS#8, RSA or SEC1).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertPair {
    pub cert: PathBuf,
    pub key: PathBuf,
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn read(path: &Path) -> Result<Vec<u8>, String> {
    std::fs::read(path).map_err(|e| format!("tls: cannot read {}: {e}", path.display()))
}

fn read_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, String> {
    let pem = read(path)?;
    let certs = rustls_pemfile::certs(&mut pem.as_slice())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("tls: {}: bad PEM: {e}", path.display()))?;
    if certs.is_empty() {
        return Err(format!("tls: {} holds no certificate", path.display()));
    }
    Ok(certs)
}

fn read_key(path: &Path) -> Result<PrivateKeyDer<'static>, String> {
    let pem = read(path)?;
    match rustls_pemfile::private_key(&mut pem.as_slice()) {
        Ok(Some(key)) => Ok(key),
        Ok(None) => Err(format!(
            "tls: {} holds no private key (PKCS#8, RSA or SEC1 PEM)",
            path.display()
        )),
        Err(e) => Err(format!("tls: {}: bad PEM: {e}", path.display())),
    }
}

/// Loads one pair and proves the key belongs to the leaf certificate, so a mix-up is
/// reported at start or reload instead of as handshake failures on live traffic.
fn load_pair(pair: &CertPair, provider: &CryptoProvider) -> Result<CertifiedKey, String> {
    let (cert_path, key_path) = (pair.cert.display(), pair.key.display());
    let chain = read_certs(&pair.cert)?;
    let key = provider
        .key_provider
        .load_private_key(read_key(&pair.key)?)
        .map_err(|e| format!("tls: {key_path}: unusable private key: {e}"))?;
    let ck = CertifiedKey::new(chain, key);
    match ck.keys_match() {
        Ok(()) => Ok(ck),
        Err(rustls::Error::InconsistentKeys(rustls::InconsistentKeys::KeyMismatch)) => Err(
            format!("tls: cert {cert_path} and key {key_path} do not match"),
        ),
        Err(rustls::Error::InconsistentKeys(rustls::InconsistentKeys::Unknown)) => {
            // ring can derive the public key for RSA/ECDSA/Ed25519, so this is not expected;
            // if it happens the handshake itself will still fail loudly.
            tracing::warn!(cert = %cert_path, key = %key_path, "tls: could not check that key matches cert");
            Ok(ck)
        }
        Err(e) => Err(format!("tls: {cert_path}: invalid certificate: {e}")),
    }
}

/// Picks a certificate by SNI: exact DNS name, then `*.parent` wildcard, then the first pair.
/// (rustls' ResolvesServerCertUsingSni has neither wildcards nor a default.)
#[derive(Debug)]
struct SniResolver {
    exact: HashMap<String, Arc<CertifiedKey>>,
    wildcard: HashMap<String, Arc<CertifiedKey>>, // keyed by the parent: "example.com"
    default: Arc<CertifiedKey>,
}

impl ResolvesServerCert for SniResolver {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let Some(name) = hello.server_name() else {
            return Some(self.default.clone());
        };
        let name = name.trim_end_matches('.').to_ascii_lowercase();
        let hit = self.exact.get(&name).or_else(|| {
            // A wildcard covers exactly one label, so only the immediate parent is looked up.
            name.split_once('.')
                .and_then(|(_, parent)| self.wildcard.get(parent))
        });
        Some(hit.unwrap_or(&self.default).clone())
    }
}

/// Builds the listener's TLS config from one or more cert/key pairs (the first is the default).
pub fn server_config(pairs: &[CertPair]) -> Result<ServerConfig, String> {
    let provider = provider();
    let mut loaded = Vec::with_capacity(pairs.len());
    for pair in pairs {
        loaded.push(Arc::new(load_pair(pair, &provider)?));
    }
    let Some(default) = loaded.first().cloned() else {
        return Err("tls: no certificate configured".to_string());
    };
    let (mut exact, mut wildcard) = (HashMap::new(), HashMap::new());
    for (pair, ck) in pairs.iter().zip(&loaded) {
        let names = dns_names(&ck.cert[0]);
        if names.is_empty() {
            tracing::warn!(cert = %pair.cert.display(), "tls: certificate has no DNS subjectAltName; only usable as default");
        }
        for name in names {
            // Earlier pairs win on duplicate names, matching "first pair is the default".
            match name.strip_prefix("*.") {
                Some(parent) => wildcard
                    .entry(parent.to_string())
                    .or_insert_with(|| ck.clone()),
                None => exact.entry(name).or_insert_with(|| ck.clone()),
            };
        }
    }
    let resolver = SniResolver {
        exact,
        wildcard,
        default,
    };
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(VERSIONS)
        .map_err(|e| format!("tls: {e}"))?
        .with_no_client_auth()
        .with_cert_resolver(Arc::new(resolver));
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(config)
}

/// The listener's TLS config behind an ArcSwap: a reload swaps the config for new
/// handshakes while connections already accepted keep the config they started with.
pub struct ReloadableServerTls {
    current: ArcSwap<ServerConfig>,
}

impl ReloadableServerTls {
    pub fn new(pairs: &[CertPair]) -> Result<Self, String> {
        Ok(Self {
            current: ArcSwap::from_pointee(server_config(pairs)?),
        })
    }

    /// Loads the pairs again; on any error the running config is kept and the error returned.
    pub fn reload(&self, pairs: &[CertPair]) -> Result<(), String> {
        self.current.store(Arc::new(server_config(pairs)?));
        Ok(())
    }

    /// An acceptor on the current config; call it per accepted connection.
    pub fn acceptor(&self) -> tokio_rustls::TlsAcceptor {
        tokio_rustls::TlsAcceptor::from(self.current.load_full())
    }
}

/// A cluster's upstream TLS settings (`tls = { sni, ca }`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct UpstreamTls {
    /// Name sent as SNI and checked against the certificate; without it the URI host is used
    /// (an IP address then has to be in the certificate's IP SANs).
    pub sni: Option<String>,
    /// PEM file of trusted CA certificates; without it, the webpki (Mozilla) roots.
    pub ca: Option<PathBuf>,
}

/// Connector for a cluster: plain TCP for `http://` URIs, rustls for `https://` ones.
/// `http2` only sets the ALPN offer; the hyper client must also be built with
/// `http2_only(true)` for h2 (it is then prior knowledge on cleartext).
pub fn upstream_connector(
    tls: Option<&UpstreamTls>,
    http2: bool,
    connect_timeout: Duration,
) -> Result<HttpsConnector<HttpConnector>, String> {
    let mut http = HttpConnector::new();
    http.set_nodelay(true);
    http.set_connect_timeout(Some(connect_timeout));
    http.enforce_http(false); // https:// URIs reach the TLS layer

    let (roots, resolver): (RootCertStore, Arc<dyn ResolveServerName + Send + Sync>) = match tls {
        // A plain cluster never builds https:// URIs; an empty root store makes a stray one
        // fail verification instead of trusting anything.
        None => (
            RootCertStore::empty(),
            Arc::new(DefaultServerNameResolver::default()),
        ),
        Some(tls) => {
            let roots = match &tls.ca {
                Some(path) => {
                    let mut roots = RootCertStore::empty();
                    let (added, _) = roots.add_parsable_certificates(read_certs(path)?);
                    if added == 0 {
                        return Err(format!(
                            "tls: {} holds no usable CA certificate",
                            path.display()
                        ));
                    }
                    roots
                }
                None => RootCertStore {
                    roots: webpki_roots::TLS_SERVER_ROOTS.to_vec(),
                },
            };
            // Requests carry the endpoint's IP in the URI, so the name to send and verify
            // has to be fixed here rather than taken from the URI.
            let resolver: Arc<dyn ResolveServerName + Send + Sync> = match &tls.sni {
                Some(sni) => {
                    let name = ServerName::try_from(sni.clone())
                        .map_err(|e| format!("tls: invalid sni {sni:?}: {e}"))?;
                    Arc::new(FixedServerNameResolver::new(name))
                }
                None => Arc::new(DefaultServerNameResolver::default()),
            };
            (roots, resolver)
        }
    };
    let mut config = ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(VERSIONS)
        .map_err(|e| format!("tls: {e}"))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![if http2 {
        b"h2".to_vec()
    } else {
        b"http/1.1".to_vec()
    }];
    Ok(HttpsConnector::new(http, config, false, resolver))
}

/// DNS names from a certificate's subjectAltName. A tiny DER walk, because rustls does not
/// expose the SANs and a full X.509 parser is a big dependency for one field. The certificate
/// was already parsed by webpki in `keys_match`, so malformed input is not expected here.
fn dns_names(cert: &[u8]) -> Vec<String> {
    // One DER TLV: (tag, contents, rest). Definite lengths only, as DER requires.
    fn tlv(input: &[u8]) -> Option<(u8, &[u8], &[u8])> {
        let (&tag, rest) = input.split_first()?;
        let (&first, mut rest) = rest.split_first()?;
        let len = if first < 0x80 {
            first as usize
        } else {
            let n = (first & 0x7f) as usize;
            if n == 0 || n > 4 || rest.len() < n {
                return None;
            }
            let len = rest[..n]
                .iter()
                .fold(0usize, |acc, &b| (acc << 8) | b as usize);
            rest = &rest[n..];
            len
        };
        (rest.len() >= len).then(|| (tag, &rest[..len], &rest[len..]))
    }
    fn walk(cert: &[u8]) -> Option<Vec<String>> {
        let (_, cert, _) = tlv(cert)?; // Certificate
        let (_, mut tbs, _) = tlv(cert)?; // TBSCertificate
        while !tbs.is_empty() {
            let (tag, field, rest) = tlv(tbs)?;
            tbs = rest;
            if tag != 0xa3 {
                continue; // [3] EXPLICIT Extensions is the only field wanted
            }
            let (_, mut exts, _) = tlv(field)?;
            while !exts.is_empty() {
                let (_, ext, rest) = tlv(exts)?;
                exts = rest;
                let (_, oid, mut ext) = tlv(ext)?;
                if oid != [0x55, 0x1d, 0x11] {
                    continue; // not 2.5.29.17 subjectAltName
                }
                if let Some((0x01, _, after_critical)) = tlv(ext) {
                    ext = after_critical;
                }
                let (_, value, _) = tlv(ext)?; // OCTET STRING
                let (_, mut names, _) = tlv(value)?; // GeneralNames
                let mut out = Vec::new();
                while !names.is_empty() {
                    let (tag, name, rest) = tlv(names)?;
                    names = rest;
                    if tag == 0x82 {
                        // [2] IMPLICIT IA5String dNSName
                        out.extend(std::str::from_utf8(name).ok().map(str::to_ascii_lowercase));
                    }
                }
                return Some(out);
            }
        }
        Some(Vec::new())
    }
    walk(cert).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use http_body_util::{BodyExt, Empty, Full};
    use hyper::body::Incoming;
    use hyper::{Request, Response, Version};
    use hyper_util::rt::{TokioExecutor, TokioIo};
    use std::net::SocketAddr;
    use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
    use tokio::net::{TcpListener, TcpStream};

    /// A private CA (made at test time) and a temp dir for the PEM files it signs.
    struct Ca {
        cert: rcgen::Certificate,
        key: rcgen::KeyPair,
        dir: tempfile::TempDir,
    }

    impl Ca {
        fn new(name: &str) -> Ca {
            let key = rcgen::KeyPair::generate().unwrap();
            let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
            params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
            params
                .distinguished_name
                .push(rcgen::DnType::CommonName, name);
            Ca {
                cert: params.self_signed(&key).unwrap(),
                key,
                dir: tempfile::tempdir().unwrap(),
            }
        }
        fn write(&self, name: &str, data: &str) -> PathBuf {
            let path = self.dir.path().join(name);
            std::fs::write(&path, data).unwrap();
            path
        }
        /// A leaf for `names` (DNS names or IPs) written as FILE.pem/FILE.key; also its DER.
        fn leaf(&self, file: &str, names: &[&str]) -> (CertPair, Vec<u8>) {
            let key = rcgen::KeyPair::generate().unwrap();
            let names: Vec<String> = names.iter().map(|s| s.to_string()).collect();
            let cert = rcgen::CertificateParams::new(names)
                .unwrap()
                .signed_by(&key, &self.cert, &self.key)
                .unwrap();
            let cert_path = self.write(&format!("{file}.pem"), &cert.pem());
            let key_path = self.write(&format!("{file}.key"), &key.serialize_pem());
            (
                CertPair {
                    cert: cert_path,
                    key: key_path,
                },
                cert.der().to_vec(),
            )
        }
        fn client(
            &self,
            alpn: &[&[u8]],
            versions: &[&'static SupportedProtocolVersion],
        ) -> Arc<ClientConfig> {
            let mut roots = RootCertStore::empty();
            roots.add(self.cert.der().clone()).unwrap();
            let mut config = ClientConfig::builder_with_provider(provider())
                .with_protocol_versions(versions)
                .unwrap()
                .with_root_certificates(roots)
                .with_no_client_auth();
            config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
            Arc::new(config)
        }
    }

    /// Counts of what the test server saw.
    #[derive(Default)]
    struct Seen {
        accepted: AtomicUsize,
        in_flight: AtomicUsize,
        max_in_flight: AtomicUsize,
    }

    /// Test server on loopback: counts TCP accepts, terminates TLS with the reloadable acceptor
    /// (or none), serves h1/h2 with hyper, answers with the HTTP version it saw.
    async fn serve(tls: Option<Arc<ReloadableServerTls>>) -> (SocketAddr, Arc<Seen>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let (addr, seen) = (listener.local_addr().unwrap(), Arc::new(Seen::default()));
        let seen2 = seen.clone();
        tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                seen2.accepted.fetch_add(1, SeqCst);
                let (tls, seen) = (tls.as_ref().map(|t| t.acceptor()), seen2.clone());
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
                        let seen = seen.clone();
                        async move {
                            let now = seen.in_flight.fetch_add(1, SeqCst) + 1;
                            seen.max_in_flight.fetch_max(now, SeqCst);
                            tokio::time::sleep(Duration::from_millis(20)).await;
                            seen.in_flight.fetch_sub(1, SeqCst);
                            let body = Full::new(Bytes::from(format!("{:?}", req.version())));
                            Ok::<_, std::convert::Infallible>(Response::new(body))
                        }
                    });
                    let server = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
                    let _ = match tls {
                        Some(acceptor) => match acceptor.accept(tcp).await {
                            Ok(stream) => server.serve_connection(TokioIo::new(stream), svc).await,
                            Err(_) => return,
                        },
                        None => server.serve_connection(TokioIo::new(tcp), svc).await,
                    };
                });
            }
        });
        (addr, seen)
    }

    type TlsStream = tokio_rustls::client::TlsStream<TcpStream>;

    /// Client handshake with SNI `name` (an IP sends none): stream, ALPN, peer leaf DER.
    async fn connect(
        addr: SocketAddr,
        config: Arc<ClientConfig>,
        name: &str,
    ) -> Result<(TlsStream, Option<Vec<u8>>, Vec<u8>), std::io::Error> {
        let tcp = TcpStream::connect(addr).await?;
        let name = ServerName::try_from(name.to_string()).unwrap();
        let tls = tokio_rustls::TlsConnector::from(config)
            .connect(name, tcp)
            .await?;
        let conn = tls.get_ref().1;
        let (alpn, leaf) = (
            conn.alpn_protocol().map(<[u8]>::to_vec),
            conn.peer_certificates().unwrap()[0].to_vec(),
        );
        Ok((tls, alpn, leaf))
    }

    fn get(uri: &str) -> Request<Empty<Bytes>> {
        Request::get(uri).body(Empty::new()).unwrap()
    }

    async fn text(resp: Response<Incoming>) -> String {
        assert_eq!(resp.status(), 200);
        String::from_utf8(
            resp.into_body()
                .collect()
                .await
                .unwrap()
                .to_bytes()
                .to_vec(),
        )
        .unwrap()
    }

    async fn h2(tls: TlsStream) -> hyper::client::conn::http2::SendRequest<Empty<Bytes>> {
        let (sender, conn) =
            hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tls))
                .await
                .unwrap();
        tokio::spawn(conn);
        sender
    }

    /// "outer: cause: cause" — the text the proxy will log for an upstream failure.
    fn chain(e: &(dyn std::error::Error + 'static)) -> String {
        let (mut text, mut cur) = (e.to_string(), e.source());
        while let Some(cause) = cur {
            text = format!("{text}: {cause}");
            cur = cause.source();
        }
        text
    }

    async fn within<F: std::future::Future>(f: F) -> F::Output {
        tokio::time::timeout(Duration::from_secs(20), f)
            .await
            .expect("test timed out")
    }

    #[tokio::test]
    async fn https_over_http1_and_h2() {
        within(async {
            let ca = Ca::new("edge-router test CA");
            let (a, _) = ca.leaf("a", &["a.test"]);
            let (addr, seen) = serve(Some(Arc::new(ReloadableServerTls::new(&[a]).unwrap()))).await;
            let all = [&rustls::version::TLS13, &rustls::version::TLS12];
            for (offer, want) in [
                (&[&b"http/1.1"[..]][..], "http/1.1"),
                (&[b"h2"], "h2"),
                (&[b"h2", b"http/1.1"], "h2"),
            ] {
                let (tls, alpn, _) = connect(addr, ca.client(offer, &all), "a.test")
                    .await
                    .unwrap();
                assert_eq!(alpn.as_deref(), Some(want.as_bytes()));
                let body = if want == "h2" {
                    text(
                        h2(tls)
                            .await
                            .send_request(get("https://a.test/"))
                            .await
                            .unwrap(),
                    )
                    .await
                } else {
                    let (mut sender, conn) =
                        hyper::client::conn::http1::handshake(TokioIo::new(tls))
                            .await
                            .unwrap();
                    tokio::spawn(conn);
                    text(sender.send_request(get("https://a.test/")).await.unwrap()).await
                };
                assert_eq!(body, if want == "h2" { "HTTP/2.0" } else { "HTTP/1.1" });
            }
            // TLS 1.2-only and 1.3-only clients both get through.
            for v in [&rustls::version::TLS12, &rustls::version::TLS13] {
                let (tls, _, _) = connect(addr, ca.client(&[b"h2"], &[v]), "a.test")
                    .await
                    .unwrap();
                assert_eq!(tls.get_ref().1.protocol_version(), Some(v.version));
            }
            assert_eq!(seen.accepted.load(SeqCst), 5);
        })
        .await
    }

    #[tokio::test]
    async fn sni_picks_the_certificate() {
        within(async {
            let ca = Ca::new("edge-router test CA");
            let (a, a_der) = ca.leaf("a", &["a.test", "127.0.0.1"]);
            let (b, b_der) = ca.leaf("b", &["b.test"]);
            let (w, w_der) = ca.leaf("w", &["*.wild.test", "exact.wild.test"]);
            let (e, e_der) = ca.leaf("e", &["x.wild.test"]);
            assert_eq!(dns_names(&w_der), ["*.wild.test", "exact.wild.test"]);
            assert_eq!(dns_names(&a_der), ["a.test"]); // the IP SAN is not a DNS name
            let tls = ReloadableServerTls::new(&[a, b, w, e]).unwrap();
            let (addr, _) = serve(Some(Arc::new(tls))).await;
            let client = ca.client(&[b"h2"], &[&rustls::version::TLS13]);
            for (sni, want) in [
                ("a.test", &a_der),
                ("B.TEST", &b_der),
                ("y.wild.test", &w_der),
                ("x.wild.test", &e_der),
                ("127.0.0.1", &a_der),
            ] {
                let (_, _, leaf) = connect(addr, client.clone(), sni).await.unwrap();
                assert!(&leaf == want, "wrong certificate for {sni}");
            }
            // Unknown names get the default (a.test) cert, which the client then refuses.
            for sni in ["c.test", "deep.y.wild.test"] {
                let Err(err) = connect(addr, client.clone(), sni).await else {
                    panic!("{sni}: handshake should fail")
                };
                assert!(err.to_string().contains("not valid for name"), "{err}");
            }
        })
        .await
    }

    #[tokio::test]
    async fn reload_swaps_certificate_for_new_connections_only() {
        within(async {
            let ca = Ca::new("edge-router test CA");
            let (a1, a1_der) = ca.leaf("a1", &["a.test"]);
            let (a2, a2_der) = ca.leaf("a2", &["a.test"]);
            let tls = Arc::new(ReloadableServerTls::new(std::slice::from_ref(&a1)).unwrap());
            let (addr, seen) = serve(Some(tls.clone())).await;
            let client = ca.client(&[b"h2"], &[&rustls::version::TLS13]);
            let (old, _, leaf) = connect(addr, client.clone(), "a.test").await.unwrap();
            assert_eq!(leaf, a1_der);
            let mut old = h2(old).await;
            assert_eq!(
                text(old.send_request(get("https://a.test/")).await.unwrap()).await,
                "HTTP/2.0"
            );

            tls.reload(std::slice::from_ref(&a2)).unwrap();
            assert_eq!(
                connect(addr, client.clone(), "a.test").await.unwrap().2,
                a2_der
            );
            // The connection opened before the reload keeps working.
            assert_eq!(
                text(old.send_request(get("https://a.test/")).await.unwrap()).await,
                "HTTP/2.0"
            );

            // Bad reloads fail with a clear message and keep a2.
            let mismatched = CertPair {
                cert: a2.cert.clone(),
                key: a1.key.clone(),
            };
            let missing = CertPair {
                cert: ca.dir.path().join("nope.pem"),
                key: a1.key.clone(),
            };
            let empty = CertPair {
                cert: ca.write("empty.pem", ""),
                key: a1.key.clone(),
            };
            let keyless = CertPair {
                cert: a1.cert.clone(),
                key: a1.cert.clone(),
            };
            let expect = [
                (
                    mismatched,
                    format!(
                        "tls: cert {} and key {} do not match",
                        a2.cert.display(),
                        a1.key.display()
                    ),
                ),
                (
                    missing.clone(),
                    format!("tls: cannot read {}: No such file", missing.cert.display()),
                ),
                (
                    empty,
                    format!(
                        "tls: {} holds no certificate",
                        ca.dir.path().join("empty.pem").display()
                    ),
                ),
                (
                    keyless,
                    format!("tls: {} holds no private key", a1.cert.display()),
                ),
            ];
            for (pair, want) in expect {
                let err = tls.reload(&[a2.clone(), pair]).unwrap_err();
                assert!(err.starts_with(&want), "{err}");
            }
            assert_eq!(
                tls.reload(&[]).unwrap_err(),
                "tls: no certificate configured"
            );
            assert_eq!(connect(addr, client, "a.test").await.unwrap().2, a2_der);
            assert_eq!(seen.accepted.load(SeqCst), 3);
        })
        .await
    }

    type Client = hyper_util::client::legacy::Client<HttpsConnector<HttpConnector>, Empty<Bytes>>;

    fn client(tls: Option<&UpstreamTls>, http2: bool) -> Client {
        let connector = upstream_connector(tls, http2, Duration::from_secs(2)).unwrap();
        hyper_util::client::legacy::Client::builder(TokioExecutor::new())
            .http2_only(http2)
            .build(connector)
    }

    #[tokio::test]
    async fn upstream_tls_private_ca_sni_and_refusals() {
        within(async {
            let ca = Ca::new("edge-router test CA");
            let (a, _) = ca.leaf("a", &["a.test", "127.0.0.1"]);
            let ca_file = ca.write("ca.pem", &ca.cert.pem());
            let (addr, _) = serve(Some(Arc::new(ReloadableServerTls::new(&[a]).unwrap()))).await;
            let url = format!("https://{addr}/");
            let tls = |sni: Option<&str>, ca: &PathBuf| UpstreamTls {
                sni: sni.map(str::to_string),
                ca: Some(ca.clone()),
            };
            for sni in [Some("a.test"), None] {
                let resp = client(Some(&tls(sni, &ca_file)), false)
                    .request(get(&url))
                    .await
                    .unwrap();
                assert_eq!(text(resp).await, "HTTP/1.1");
            }
            let other = Ca::new("some other CA");
            let wrong_ca = other.write("ca.pem", &other.cert.pem());
            let cases = [
                (Some(tls(Some("a.test"), &wrong_ca)), "UnknownIssuer"),
                (
                    Some(tls(Some("c.test"), &ca_file)),
                    "not valid for name \"c.test\"",
                ),
                (None, "UnknownIssuer"),
            ]; // plain-only connector given an https URI
            for (tls, want) in cases {
                let err = client(tls.as_ref(), false)
                    .request(get(&url))
                    .await
                    .unwrap_err();
                let text = chain(&err);
                eprintln!("upstream error chain: {text}");
                assert!(text.contains(want), "{text}");
            }
            // A plain cluster reaches a cleartext upstream.
            let (plain, _) = serve(None).await;
            let resp = client(None, false)
                .request(get(&format!("http://{plain}/")))
                .await
                .unwrap();
            assert_eq!(text(resp).await, "HTTP/1.1");
            // Config errors are reported before any traffic.
            let bad = upstream_connector(
                Some(&tls(Some("a.test"), &ca.dir.path().join("no.pem"))),
                false,
                Duration::from_secs(1),
            );
            assert!(bad.err().unwrap().starts_with("tls: cannot read"));
        })
        .await
    }

    #[tokio::test]
    async fn upstream_h2_over_tls_shares_one_connection() {
        within(async {
            let ca = Ca::new("edge-router test CA");
            let (a, _) = ca.leaf("a", &["a.test"]);
            let (addr, seen) = serve(Some(Arc::new(ReloadableServerTls::new(&[a]).unwrap()))).await;
            let tls = UpstreamTls {
                sni: Some("a.test".into()),
                ca: Some(ca.write("ca.pem", &ca.cert.pem())),
            };
            let client = client(Some(&tls), true);
            let url = format!("https://{addr}/");
            let responses =
                futures_util::future::join_all((0..50).map(|_| client.request(get(&url)))).await;
            for resp in responses {
                let resp = resp.unwrap();
                assert_eq!(resp.version(), Version::HTTP_2);
                assert_eq!(text(resp).await, "HTTP/2.0");
            }
            assert_eq!(
                seen.accepted.load(SeqCst),
                1,
                "all 50 requests on one connection"
            );
            assert!(
                seen.max_in_flight.load(SeqCst) > 1,
                "requests were multiplexed, not serialized"
            );
        })
        .await
    }
}
