//! The addresses a webhook may reach without `--webhook-allow-private`: public unicast
//! only. Checked on a URL whose host is an address, and on every address a name
//! resolves to, so the check is on what is actually connected to.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

/// Whether `ip` is out of a webhook's reach without `--webhook-allow-private`: every
/// range of IANA's special-purpose registries that is not globally reachable, and on
/// IPv6 anything outside global unicast.
pub(super) fn is_private(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => is_private_v4(v4),
        IpAddr::V6(v6) => is_private_v6(v6),
    }
}

fn is_private_v4(ip: Ipv4Addr) -> bool {
    matches!(
        ip.octets(),
        [0, ..] // "this network", 0.0.0.0 among them
            | [10, ..]
            | [100, 64..=127, ..] // shared (CGNAT); Alibaba's metadata 100.100.100.200
            | [127, ..]
            | [169, 254, ..] // link-local; the clouds' metadata 169.254.169.254
            | [172, 16..=31, ..]
            | [192, 0, 0, _] // protocol assignments; Oracle's metadata 192.0.0.192
            | [192, 0, 2, _] // documentation
            | [192, 88, 99, _] // the retired 6to4 relays
            | [192, 168, ..]
            | [198, 18..=19, ..] // benchmarking
            | [198, 51, 100, _] // documentation
            | [203, 0, 113, _] // documentation
            | [224..=255, ..] // multicast, reserved, broadcast
    )
}

fn is_private_v6(ip: Ipv6Addr) -> bool {
    // An IPv4 address written in IPv6 reaches that IPv4 address: judged as it.
    if let Some(v4) = embedded_v4(ip) {
        return is_private_v4(v4);
    }
    let s = ip.segments();
    // Only global unicast (2000::/3) is public. Outside it: unspecified, loopback,
    // IPv4-compatible (::/96, retired), local NAT64 (64:ff9b:1::/48, whose IPv4 address
    // lies where the operator chose), discard (100::/64), SRv6 (5f00::/16), unique
    // local (fc00::/7, AWS's metadata fd00:ec2::254), site-local (fec0::/10, retired),
    // link-local (fe80::/10), multicast (ff00::/8) and space not yet assigned.
    if s[0] & 0xe000 != 0x2000 {
        return true;
    }
    // Inside it: IETF protocol assignments (2001::/23: Teredo, benchmarking, ORCHID)
    // and documentation (2001:db8::/32, 3fff::/20).
    match s[0] {
        0x2001 => s[1] < 0x0200 || s[1] == 0x0db8,
        0x3fff => s[1] < 0x1000,
        _ => false,
    }
}

/// The IPv4 address an IPv6 address stands for, where it says so exactly:
/// IPv4-mapped (`::ffff:a.b.c.d`, a dual-stack socket connects to a.b.c.d), NAT64's
/// well-known prefix (`64:ff9b::a.b.c.d`, translated to a.b.c.d: refusing it whole
/// would refuse every IPv4-only receiver of an IPv6-only host behind DNS64) and 6to4
/// (`2002:aabb:ccdd::`, tunnelled to a.b.c.d).
fn embedded_v4(ip: Ipv6Addr) -> Option<Ipv4Addr> {
    let s = ip.segments();
    let v4 = |hi: u16, lo: u16| {
        let [a, b] = hi.to_be_bytes();
        let [c, d] = lo.to_be_bytes();
        Ipv4Addr::new(a, b, c, d)
    };
    if let Some(mapped) = ip.to_ipv4_mapped() {
        Some(mapped)
    } else if s[..6] == [0x64, 0xff9b, 0, 0, 0, 0] {
        Some(v4(s[6], s[7]))
    } else if s[0] == 0x2002 {
        Some(v4(s[1], s[2]))
    } else {
        None
    }
}

/// A URL whose host is an address (no name to resolve) is checked here.
pub(super) fn check_literal_host(url: &str, allow_private: bool) -> Result<(), String> {
    if allow_private {
        return Ok(());
    }
    // Parsed as the HTTP client parses it: `2130706433` and `127.1` are addresses too.
    let host = reqwest::Url::parse(url)
        .ok()
        .and_then(|u| u.host_str().map(|h| h.trim_matches(['[', ']']).to_owned()));
    match host.and_then(|h| h.parse::<IpAddr>().ok()) {
        Some(ip) if is_private(ip) => Err(format!(
            "refused: {ip} is a private address (--webhook-allow-private allows it)"
        )),
        _ => Ok(()),
    }
}

/// A name that resolves, but only to addresses a webhook may not reach. Unlike a name
/// that does not resolve (yet), it is not tried again.
#[derive(Debug)]
pub(super) struct OnlyPrivate {
    host: String,
    found: Vec<IpAddr>,
}

impl fmt::Display for OnlyPrivate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let found: Vec<String> = self.found.iter().map(IpAddr::to_string).collect();
        write!(
            f,
            "refused: {} resolves only to private addresses ({}); --webhook-allow-private allows them",
            self.host,
            found.join(", ")
        )
    }
}

impl std::error::Error for OnlyPrivate {}

impl OnlyPrivate {
    /// The refusal somewhere in the causes of a failed request, if that is why.
    pub(super) fn cause_of(error: &reqwest::Error) -> Option<&OnlyPrivate> {
        let mut cause: Option<&(dyn std::error::Error + 'static)> = Some(error);
        while let Some(e) = cause {
            if let Some(refused) = e.downcast_ref::<OnlyPrivate>() {
                return Some(refused);
            }
            cause = e.source();
        }
        None
    }
}

/// Resolves names as the system does, then keeps only the addresses webhooks may
/// reach: the check is on what is actually connected to.
pub(super) struct Resolver {
    pub(super) allow_private: bool,
}

impl reqwest::dns::Resolve for Resolver {
    fn resolve(&self, name: reqwest::dns::Name) -> reqwest::dns::Resolving {
        let allow_private = self.allow_private;
        Box::pin(async move {
            let host = name.as_str().to_owned();
            let found: Vec<SocketAddr> =
                tokio::net::lookup_host((host.as_str(), 0)).await?.collect();
            let addrs = allowed(&host, &found, allow_private)?;
            let addrs: reqwest::dns::Addrs = Box::new(addrs.into_iter());
            Ok(addrs)
        })
    }
}

/// What of `found` may be connected to; an error if nothing (retried if nothing was
/// found, refused if all of it is private).
fn allowed(
    host: &str,
    found: &[SocketAddr],
    allow_private: bool,
) -> Result<Vec<SocketAddr>, Box<dyn std::error::Error + Send + Sync>> {
    if found.is_empty() {
        return Err(format!("{host} resolves to no address").into());
    }
    let allowed: Vec<SocketAddr> = found
        .iter()
        .copied()
        .filter(|a| allow_private || !is_private(a.ip()))
        .collect();
    if allowed.is_empty() {
        let mut ips: Vec<IpAddr> = Vec::new();
        for ip in found.iter().map(SocketAddr::ip) {
            if !ips.contains(&ip) {
                ips.push(ip);
            }
        }
        return Err(Box::new(OnlyPrivate {
            host: host.to_owned(),
            found: ips,
        }));
    }
    Ok(allowed)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn private(ip: &str) -> bool {
        is_private(ip.parse().unwrap())
    }

    #[test]
    fn every_special_purpose_ipv4_range_is_private() {
        for ip in [
            "0.0.0.0",
            "0.1.2.3",
            "10.1.2.3",
            "100.64.0.1",
            "100.100.100.200",
            "100.127.255.255",
            "127.0.0.1",
            "127.255.255.254",
            "169.254.169.254",
            "172.16.0.1",
            "172.31.255.255",
            "192.0.0.192",
            "192.0.2.1",
            "192.88.99.1",
            "192.168.1.1",
            "198.18.0.1",
            "198.19.255.255",
            "198.51.100.7",
            "203.0.113.9",
            "224.0.0.1",
            "239.255.255.250",
            "240.0.0.1",
            "255.255.255.255",
        ] {
            assert!(private(ip), "{ip}");
        }
        for ip in [
            "8.8.8.8",
            "1.1.1.1",
            "100.63.255.255",
            "100.128.0.0",
            "172.15.255.255",
            "172.32.0.0",
            "192.0.1.1",
            "198.17.255.255",
            "198.20.0.0",
            "223.255.255.255",
        ] {
            assert!(!private(ip), "{ip}");
        }
    }

    #[test]
    fn every_special_purpose_ipv6_range_is_private() {
        for ip in [
            "::",
            "::1",
            "::7f00:1",           // IPv4-compatible, retired
            "::808:808",          // even of a public address
            "64:ff9b:1::808:808", // local NAT64
            "100::1",             // discard
            "2001::1",            // Teredo
            "2001:2::1",          // benchmarking
            "2001:1ff::1",
            "2001:db8::1", // documentation
            "3fff::1",
            "3fff:fff::1",
            "5f00::1", // SRv6
            "fc00::1",
            "fd00:ec2::254", // AWS's metadata
            "fec0::1",       // site-local, retired
            "feff::1",
            "fe80::1",
            "febf::1",
            "ff02::1",
            "1::1", // not assigned
            "4000::1",
        ] {
            assert!(private(ip), "{ip}");
        }
        for ip in [
            "2606:4700::1111",
            "2001:4860:4860::8888",
            "2001:200::1",
            "2001:db9::1",
            "3fff:1000::1",
            "2a00:1450::1",
        ] {
            assert!(!private(ip), "{ip}");
        }
    }

    #[test]
    fn an_ipv4_address_written_in_ipv6_is_judged_as_the_ipv4_address() {
        for (v6, private_v4) in [
            ("::ffff:127.0.0.1", true),
            ("::ffff:10.0.0.1", true),
            ("::ffff:169.254.169.254", true),
            ("::ffff:8.8.8.8", false),
            ("64:ff9b::7f00:1", true),
            ("64:ff9b::a9fe:a9fe", true),
            ("64:ff9b::808:808", false),
            ("2002:7f00:1::", true),
            ("2002:c0a8:101::1", true),
            ("2002:808:808::1", false),
        ] {
            assert_eq!(private(v6), private_v4, "{v6}");
        }
    }

    #[test]
    fn a_literal_host_is_checked_as_the_client_parses_it() {
        assert!(check_literal_host("https://127.0.0.1/x", false).is_err());
        assert!(check_literal_host("https://[::1]/x", false).is_err());
        assert!(check_literal_host("https://[::ffff:7f00:1]/x", false).is_err());
        assert!(check_literal_host("https://[fec0::1]/x", false).is_err());
        assert!(check_literal_host("https://127.0.0.1/x", true).is_ok());
        for numeric in [
            "https://2130706433/x",
            "https://127.1/x",
            "https://0x7f.0.0.1/x",
        ] {
            assert!(check_literal_host(numeric, false).is_err(), "{numeric}");
        }
        assert!(check_literal_host("https://hooks.example.com/x", false).is_ok());
        assert!(check_literal_host("https://8.8.8.8/x", false).is_ok());
    }

    #[test]
    fn a_name_resolving_only_to_private_addresses_is_refused_for_good() {
        let at = |ip: &str| SocketAddr::new(ip.parse().unwrap(), 0);
        let both = [at("10.0.0.1"), at("8.8.8.8")];
        assert_eq!(allowed("mixed", &both, false).unwrap(), [at("8.8.8.8")]);
        assert_eq!(allowed("mixed", &both, true).unwrap(), both);

        let private = [at("127.0.0.1"), at("::1"), at("127.0.0.1")];
        let refused = allowed("local", &private, false).unwrap_err();
        let refused = refused.downcast_ref::<OnlyPrivate>().expect("a refusal");
        assert_eq!(
            refused.to_string(),
            "refused: local resolves only to private addresses (127.0.0.1, ::1); --webhook-allow-private allows them"
        );

        // Nothing found is no refusal: it is tried again.
        let none = allowed("void", &[], false).unwrap_err();
        assert!(none.downcast_ref::<OnlyPrivate>().is_none());
        assert_eq!(none.to_string(), "void resolves to no address");
    }
}
