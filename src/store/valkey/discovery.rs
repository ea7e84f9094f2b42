//! Which of this shard's topics exist in Valkey and what they hold: the `SCAN` that finds
//! their streams (at start and periodically, so topics written before a restart or by
//! another tool are listed; on every master in Valkey Cluster mode), and `XINFO STREAM`
//! stats of one topic or all of them.
//!
//! Does not own the cache of known topics and lengths it fills (the tier's state, in the
//! parent module), nor topic names' shard ownership rule ([`crate::shard::router`]).

use super::entry::parse_entry;
use super::{is_no_such_key, on, store_error, ValkeyTier};
use crate::store::hot_tier::TopicStats;
use crate::store::StoreError;
use crate::valkey::{Command, Reply};

impl ValkeyTier {
    /// Finds the streams of this shard's topics with `SCAN` (never `KEYS`, which blocks Valkey
    /// for the whole keyspace walk).
    pub async fn discover_topics(&self) -> Result<usize, StoreError> {
        // In Valkey Cluster mode each master holds its own slots' keys: SCAN every one.
        let mut found = 0;
        for node in self.masters().await? {
            found += self.discover_on(node.as_ref()).await?;
        }
        self.discovered.set(true);
        Ok(found)
    }

    /// One full SCAN of one node (`None`: the only one).
    async fn discover_on(
        &self,
        node: Option<&crate::valkey::NodeAddr>,
    ) -> Result<usize, StoreError> {
        let pattern = self.stream_key.scan_pattern();
        let mut cursor = String::from("0");
        let mut found = 0;
        loop {
            self.count("scan", 1);
            let reply = self
                .client
                .call_on(
                    node,
                    &[
                        b"SCAN",
                        cursor.as_bytes(),
                        b"MATCH",
                        pattern.as_bytes(),
                        b"COUNT",
                        b"1000",
                        b"TYPE",
                        b"stream",
                    ],
                )
                .await
                .map_err(store_error)?;
            let Reply::Array(parts) = reply else {
                return Err(StoreError::Unavailable("unexpected SCAN reply".into()));
            };
            let [next, keys] = parts.as_slice() else {
                return Err(StoreError::Unavailable("unexpected SCAN reply".into()));
            };
            if let Reply::Array(keys) = keys {
                let mut known = self.known.borrow_mut();
                for key in keys {
                    let Some(key) = key.as_str() else {
                        continue;
                    };
                    if let Some(topic) = self.stream_key.topic_of(key) {
                        if crate::topic::is_stored_name(topic)
                            && self.owns(topic)
                            && known.insert(topic.to_owned())
                        {
                            found += 1;
                        }
                    }
                }
            }
            cursor = next.as_str().unwrap_or("0").to_owned();
            if cursor == "0" {
                return Ok(found);
            }
        }
    }

    fn owns(&self, topic: &str) -> bool {
        crate::shard::router::owner_of(topic, self.shards) == self.shard
    }

    /// Every topic of this shard that exists in Valkey, with stats (one pipeline).
    pub async fn topics(&self) -> Result<Vec<TopicStats>, StoreError> {
        if !self.discovered.get() {
            self.discover_topics().await?;
        }
        let names: Vec<String> = self.known.borrow().iter().cloned().collect();
        let commands: Vec<Command> = names
            .iter()
            .map(|topic| {
                on(
                    topic,
                    &[
                        b"XINFO",
                        b"STREAM",
                        self.stream_key.render(topic).as_bytes(),
                    ],
                )
            })
            .collect();
        self.count("xinfo", commands.len());
        let replies = self.client.call_many(&commands).await;
        let mut topics = Vec::with_capacity(names.len());
        for (name, reply) in names.into_iter().zip(replies) {
            let stats = match reply {
                Ok(reply) => self.parse_xinfo(&name, &reply),
                Err(e) if is_no_such_key(&e) => None,
                Err(e) => return Err(store_error(e)),
            };
            match stats {
                Some(stats) => topics.push(stats),
                // Gone from Valkey (deleted by another tool): forget it everywhere, so
                // the per-topic maps hold only topics that exist.
                None => self.forget(&name),
            }
        }
        Ok(topics)
    }

    /// One topic's stats from `XINFO STREAM`; `None` when the stream does not exist.
    pub async fn stats(&self, topic: &str) -> Result<Option<TopicStats>, StoreError> {
        let key = self.stream_key.render(topic);
        self.count("xinfo", 1);
        match self
            .client
            .call_routed(topic.as_bytes(), &[b"XINFO", b"STREAM", key.as_bytes()])
            .await
        {
            Ok(reply) => Ok(self.parse_xinfo(topic, &reply)),
            Err(e) if is_no_such_key(&e) => Ok(None),
            Err(e) => Err(store_error(e)),
        }
    }

    fn parse_xinfo(&self, topic: &str, reply: &Reply) -> Option<TopicStats> {
        let Reply::Array(fields) = reply else {
            return None;
        };
        let mut stats = TopicStats::empty(topic);
        for pair in fields.chunks(2) {
            let [name, value] = pair else { continue };
            match name.as_bytes() {
                Some(b"length") => {
                    if let Reply::Integer(n) = value {
                        stats.length = usize::try_from(*n).unwrap_or(0);
                    }
                }
                Some(b"first-entry") => {
                    if let Some((id, m)) = parse_entry(value) {
                        stats.first_id = Some(id);
                        stats.oldest_timestamp_ms = Some(m.timestamp_ms);
                    }
                }
                Some(b"last-entry") => {
                    if let Some((id, m)) = parse_entry(value) {
                        stats.last_id = Some(id);
                        stats.newest_timestamp_ms = Some(m.timestamp_ms);
                    }
                }
                _ => {}
            }
        }
        self.lengths
            .borrow_mut()
            .insert(topic.to_owned(), stats.length);
        Some(stats)
    }
}
