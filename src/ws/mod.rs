//! WebSocket delivery, sans-IO: the opening handshake ([`handshake`]), RFC 6455 framing
//! ([`codec`]) and the relay's JSON messages ([`protocol`]).
//!
//! Nothing here touches a socket, a clock or shard state: the connection loop feeds received
//! bytes to a [`codec::Decoder`], hands complete text messages to
//! [`protocol::parse_client_message`], and writes what the encoders produce. A message
//! published to a topic is framed once ([`codec::text_frame_from_parts`] with
//! [`protocol::MESSAGE_PREFIX`]) and the same `Bytes` are written to every subscriber.

pub mod codec;
pub mod handshake;
pub mod protocol;
