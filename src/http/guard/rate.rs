//! Token-bucket rate limits: one bucket per client address, per principal, and per address
//! for logins, kept by each shard for the requests it serves.
//!
//! Per shard, not per relay: a bucket lives where the connection landed (`SO_REUSEPORT`
//! spreads a client's connections over the shards), so a relay of N shards lets an address
//! through up to N times a bucket's rate. Sharing buckets would cost a cross-shard message or a
//! Valkey round trip on every request, for limits that exist to stop floods, not to meter
//! exactly; the shard-local map needs no lock and no atomic.
//!
//! Memory is bounded: each scope keeps at most `rate_limit.max_tracked` buckets in two
//! generations of half that size. A bucket touched is in the current one; when it is full the
//! previous generation (buckets not touched for a whole generation) is dropped and the current
//! one becomes previous. Constant time per request, and an attacker cycling source addresses
//! can only make the relay forget idle buckets sooner; a forgotten bucket comes back full, so
//! forgetting errs towards letting a client through, never towards refusing it.
//!
//! Owns: the bucket arithmetic, the bounded maps, the scopes and their keys (an IPv6 client
//! is its /64: one host gets a whole /64 to pick addresses from). Does not own: who the client
//! is (`client`), the clock (every call takes `now`), or the 429 answer (`guard`).

use std::borrow::Borrow;
use std::collections::HashMap;
use std::hash::Hash;
use std::net::{IpAddr, Ipv6Addr};
use std::time::{Duration, Instant};

use crate::config::{BucketConfig, IpNet, RateLimitConfig};

/// Whole seconds a refused client should wait before a request can pass: at least 1.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RetryAfter(pub u32);

/// Which limit refused a request; the `scope` label of `relay_rate_limited_total`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scope {
    Address,
    Principal,
    Login,
}

impl Scope {
    pub const ALL: [Scope; 3] = [Scope::Address, Scope::Principal, Scope::Login];

    pub fn as_str(self) -> &'static str {
        match self {
            Scope::Address => "address",
            Scope::Principal => "principal",
            Scope::Login => "login",
        }
    }
}

/// A bucket's shape in time: one request per `interval` sustained, `burst` at once.
#[derive(Clone, Copy, Debug)]
struct Shape {
    /// `per / count` of the rate: how long one token takes to come back.
    interval: Duration,
    /// `burst × interval`: how far ahead of now a client may have spent.
    tolerance: Duration,
}

impl Shape {
    fn of(config: BucketConfig) -> Shape {
        // The declared ranges keep count ≤ 10^9 (a u32) and ≥ 1 here (0 means off, no bucket).
        let count = u32::try_from(config.rate.count.max(1)).unwrap_or(u32::MAX);
        let interval = config.rate.per / count;
        Shape {
            interval,
            tolerance: interval.saturating_mul(config.burst),
        }
    }
}

/// A token bucket kept as the time it would next be full (the generic cell rate algorithm:
/// integer time arithmetic, so `burst` requests pass exactly and the wait it advertises is
/// exact, where a float count of tokens drifts by rounding).
#[derive(Clone, Copy, Debug)]
struct TokenBucket {
    /// When every token spent so far is back; at or before now the bucket is full.
    full_at: Instant,
}

impl TokenBucket {
    fn full(now: Instant) -> TokenBucket {
        TokenBucket { full_at: now }
    }

    fn take(&mut self, shape: Shape, now: Instant) -> Result<(), RetryAfter> {
        let from = self.full_at.max(now);
        let Some(full_at) = from.checked_add(shape.interval) else {
            return Err(RetryAfter(u32::MAX));
        };
        let ahead = full_at.saturating_duration_since(now);
        if ahead <= shape.tolerance {
            self.full_at = full_at;
            return Ok(());
        }
        // Until one token is back: whole seconds, rounded up, at least 1.
        let wait = ahead - shape.tolerance;
        let secs = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
        Err(RetryAfter(u32::try_from(secs).unwrap_or(u32::MAX).max(1)))
    }
}

/// One scope's buckets, at most `cap` of them, in two generations (see the module docs).
pub struct Buckets<K> {
    shape: Shape,
    /// Each generation holds at most this many.
    half: usize,
    current: HashMap<K, TokenBucket>,
    previous: HashMap<K, TokenBucket>,
}

impl<K: Hash + Eq> Buckets<K> {
    fn new(config: BucketConfig, cap: usize) -> Buckets<K> {
        Buckets {
            shape: Shape::of(config),
            half: (cap / 2).max(1),
            current: HashMap::new(),
            previous: HashMap::new(),
        }
    }

    /// Takes a token from `key`'s bucket (a full one if it has none).
    fn take<Q>(&mut self, key: &Q, now: Instant) -> Result<(), RetryAfter>
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ToOwned<Owned = K> + ?Sized,
    {
        if let Some(bucket) = self.current.get_mut(key) {
            return bucket.take(self.shape, now);
        }
        let mut bucket = match self.previous.remove(key) {
            Some(bucket) => bucket,
            None => TokenBucket::full(now),
        };
        let taken = bucket.take(self.shape, now);
        if self.current.len() >= self.half {
            self.previous = std::mem::take(&mut self.current);
        }
        self.current.insert(key.to_owned(), bucket);
        taken
    }

    /// Buckets held, both generations.
    pub fn len(&self) -> usize {
        self.current.len() + self.previous.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Every scope's buckets of one shard.
pub struct RateLimiter {
    address: Option<Buckets<IpAddr>>,
    login: Option<Buckets<IpAddr>>,
    principal: Option<Buckets<String>>,
    /// Client addresses the address and login scopes leave alone.
    exempt: Vec<IpNet>,
}

impl RateLimiter {
    pub fn new(config: &RateLimitConfig) -> RateLimiter {
        let cap = config.max_tracked;
        RateLimiter {
            address: config.address.map(|b| Buckets::new(b, cap)),
            login: config.login.map(|b| Buckets::new(b, cap)),
            principal: config.principal.map(|b| Buckets::new(b, cap)),
            exempt: config.exempt.clone(),
        }
    }

    /// One request from `client` (by `principal`, if known; a login attempt if `login`):
    /// every scope that applies takes a token, the first to refuse says how long to wait.
    pub fn check(
        &mut self,
        client: IpAddr,
        login: bool,
        principal: Option<&str>,
        now: Instant,
    ) -> Result<(), (Scope, RetryAfter)> {
        let exempt = self.exempt.iter().any(|net| net.contains(client));
        if !exempt {
            let key = address_key(client);
            if let Some(buckets) = &mut self.address {
                buckets.take(&key, now).map_err(|r| (Scope::Address, r))?;
            }
            if let (true, Some(buckets)) = (login, &mut self.login) {
                buckets.take(&key, now).map_err(|r| (Scope::Login, r))?;
            }
        }
        match principal {
            Some(id) => self
                .check_principal(id, now)
                .map_err(|r| (Scope::Principal, r)),
            None => Ok(()),
        }
    }

    /// One request by `principal_id` (a user or key id), whatever address it comes from.
    pub fn check_principal(&mut self, principal_id: &str, now: Instant) -> Result<(), RetryAfter> {
        match &mut self.principal {
            Some(buckets) => buckets.take(principal_id, now),
            None => Ok(()),
        }
    }

    /// Buckets held per scope (address, principal, login), for tests and introspection.
    pub fn tracked(&self) -> [usize; 3] {
        let len = |b: Option<usize>| b.unwrap_or(0);
        [
            len(self.address.as_ref().map(Buckets::len)),
            len(self.principal.as_ref().map(Buckets::len)),
            len(self.login.as_ref().map(Buckets::len)),
        ]
    }
}

/// The key of a client address: IPv4 as it is (IPv4-mapped IPv6 as IPv4), IPv6 its /64.
pub fn address_key(ip: IpAddr) -> IpAddr {
    match ip.to_canonical() {
        IpAddr::V6(v6) => {
            let network = u128::from(v6) & (u128::MAX << 64);
            IpAddr::V6(Ipv6Addr::from(network))
        }
        v4 => v4,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Rate;

    fn shape(rate: Rate, burst: u32) -> BucketConfig {
        BucketConfig { rate, burst }
    }

    fn config(address: BucketConfig, cap: usize) -> RateLimitConfig {
        RateLimitConfig {
            address: Some(address),
            principal: Some(shape(Rate::per_second(2), 3)),
            login: Some(shape(Rate::per_minute(10), 2)),
            exempt: vec![IpNet::parse("127.0.0.0/8").expect("literal")],
            max_tracked: cap,
        }
    }

    fn ip(text: &str) -> IpAddr {
        text.parse().expect("literal")
    }

    #[test]
    fn exactly_burst_passes_then_retry_after_names_the_refill() {
        let t0 = Instant::now();
        let mut limiter = RateLimiter::new(&config(shape(Rate::per_second(2), 5), 100));
        let client = ip("10.0.0.1");
        for i in 0..5 {
            assert_eq!(
                limiter.check(client, false, None, t0),
                Ok(()),
                "request {i}"
            );
        }
        assert_eq!(
            limiter.check(client, false, None, t0),
            Err((Scope::Address, RetryAfter(1))),
            "half a second to the next token, rounded up"
        );
        // After the advertised wait exactly one token is back (2/s × 0.5 s = 1, + 1 at 1 s).
        let t1 = t0 + Duration::from_millis(500);
        assert_eq!(limiter.check(client, false, None, t1), Ok(()));
        assert!(limiter.check(client, false, None, t1).is_err());
        // A slow rate advertises its whole wait.
        let mut slow = RateLimiter::new(&config(shape(Rate::per_minute(1), 1), 100));
        assert_eq!(slow.check(client, false, None, t0), Ok(()));
        assert_eq!(
            slow.check(client, false, None, t0 + Duration::from_secs(15)),
            Err((Scope::Address, RetryAfter(45)))
        );
        // Refill never exceeds the burst.
        let later = t0 + Duration::from_secs(3600);
        for _ in 0..5 {
            assert_eq!(limiter.check(client, false, None, later), Ok(()));
        }
        assert!(limiter.check(client, false, None, later).is_err());
    }

    #[test]
    fn addresses_are_independent_and_exempt_ones_never_limited() {
        let t0 = Instant::now();
        let mut limiter = RateLimiter::new(&config(shape(Rate::per_minute(1), 1), 100));
        assert_eq!(limiter.check(ip("10.0.0.1"), false, None, t0), Ok(()));
        assert!(limiter.check(ip("10.0.0.1"), false, None, t0).is_err());
        assert_eq!(limiter.check(ip("10.0.0.2"), false, None, t0), Ok(()));
        for _ in 0..100 {
            assert_eq!(limiter.check(ip("127.0.0.2"), true, None, t0), Ok(()));
            assert_eq!(
                limiter.check(ip("::ffff:127.0.0.1"), true, None, t0),
                Ok(()),
                "IPv4-mapped loopback is loopback"
            );
        }
        // One IPv6 /64 is one client; the next /64 another.
        assert_eq!(limiter.check(ip("2001:db8::1"), false, None, t0), Ok(()));
        assert!(limiter
            .check(ip("2001:db8::ffff:1"), false, None, t0)
            .is_err());
        assert_eq!(
            limiter.check(ip("2001:db8:0:1::1"), false, None, t0),
            Ok(())
        );
    }

    #[test]
    fn login_bucket_is_stricter_and_principal_bucket_follows_the_principal() {
        let t0 = Instant::now();
        let mut limiter = RateLimiter::new(&config(shape(Rate::per_second(1000), 1000), 100));
        let client = ip("10.0.0.9");
        assert_eq!(limiter.check(client, true, None, t0), Ok(()));
        assert_eq!(limiter.check(client, true, None, t0), Ok(()));
        assert_eq!(
            limiter.check(client, true, None, t0),
            Err((Scope::Login, RetryAfter(6))),
            "10/min: one token every 6 s"
        );
        assert_eq!(
            limiter.check(client, false, None, t0),
            Ok(()),
            "other requests keep passing"
        );
        // The principal bucket (2/s, burst 3) is the same from any address, exempt included.
        for from in ["10.0.0.1", "10.0.0.2", "127.0.0.1"] {
            assert_eq!(limiter.check(ip(from), false, Some("user-1"), t0), Ok(()));
        }
        assert_eq!(
            limiter.check(ip("10.0.0.3"), false, Some("user-1"), t0),
            Err((Scope::Principal, RetryAfter(1)))
        );
        assert_eq!(limiter.check_principal("user-2", t0), Ok(()));
        assert_eq!(
            limiter.check_principal("user-1", t0 + Duration::from_millis(500)),
            Ok(()),
            "refilled"
        );
    }

    #[test]
    fn scopes_turned_off_never_refuse() {
        let t0 = Instant::now();
        let mut limiter = RateLimiter::new(&RateLimitConfig {
            address: None,
            principal: None,
            login: None,
            exempt: Vec::new(),
            max_tracked: 100,
        });
        for _ in 0..10_000 {
            assert_eq!(limiter.check(ip("10.0.0.1"), true, Some("p"), t0), Ok(()));
        }
        assert_eq!(limiter.tracked(), [0, 0, 0]);
    }

    #[test]
    fn cycling_addresses_cannot_grow_memory_past_the_cap() {
        let t0 = Instant::now();
        let cap = 1000;
        let mut limiter = RateLimiter::new(&config(shape(Rate::per_minute(1), 1), cap));
        let steady = ip("10.255.255.255");
        assert_eq!(limiter.check(steady, false, None, t0), Ok(()));
        for i in 0..100_000u32 {
            let attacker = IpAddr::V4((0x0A00_0000 + i).into());
            let _ = limiter.check(attacker, false, None, t0);
            if i % 100 == 0 {
                // A client active throughout stays tracked, so it stays limited.
                assert!(limiter.check(steady, false, None, t0).is_err(), "at {i}");
            }
            assert!(
                limiter.tracked()[0] <= cap,
                "at {i}: {:?}",
                limiter.tracked()
            );
        }
        // Each generation holds half the cap.
        assert!(limiter.tracked()[0] >= cap / 2);
        let mut principals = Buckets::<String>::new(shape(Rate::per_second(1), 1), 100);
        for i in 0..10_000 {
            let _ = principals.take(format!("user-{i}").as_str(), t0);
            assert!(principals.len() <= 100);
        }
    }

    #[test]
    fn ipv6_keys_are_their_64() {
        assert_eq!(
            address_key(ip("2001:db8:1:2:3:4:5:6")),
            ip("2001:db8:1:2::")
        );
        assert_eq!(address_key(ip("::ffff:10.1.2.3")), ip("10.1.2.3"));
        assert_eq!(address_key(ip("10.1.2.3")), ip("10.1.2.3"));
    }
}
