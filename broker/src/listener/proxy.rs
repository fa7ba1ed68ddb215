//! PROXY protocol v1/v2 (HAProxy's format, sent by cloud load balancers that terminate TLS), so
//! the client's real address survives the load balancer. Parsing comes from the `ppp` crate;
//! this module only reads exactly the header off the socket and leaves the rest untouched.

use std::io;
use std::net::SocketAddr;
use std::time::Duration;

use ppp::{v1, v2, HeaderResult, PartialResult};
use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;

/// Largest header we accept (v2 with TLVs); more means a broken or hostile peer.
const MAX_HEADER: usize = 1024;

/// Reads the PROXY header at the start of `stream` and returns the source address it names
/// (`None` for `LOCAL`/`UNKNOWN`, e.g. load-balancer health checks).
pub async fn read_header(stream: &mut TcpStream) -> io::Result<Option<SocketAddr>> {
    let mut peek = vec![0u8; MAX_HEADER];
    loop {
        let n = stream.peek(&mut peek).await?;
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "closed before PROXY header",
            ));
        }
        let (len, addr) = parse_header(&peek[..n])?.map_or((0, None), |(l, a)| (l, Some(a)));
        if len == 0 {
            // Partial header: peek returns at once while bytes are buffered, so wait a little
            // for the rest (the caller bounds the whole read with a timeout).
            tokio::time::sleep(Duration::from_millis(5)).await;
            continue;
        }
        let mut consume = vec![0u8; len];
        stream.read_exact(&mut consume).await?;
        return Ok(addr.flatten());
    }
}

/// Parses a PROXY header at the start of `buf`: `Ok(None)` while it is incomplete, else its
/// length and the source address it names. Pure, so it can be fuzzed without a socket.
pub fn parse_header(buf: &[u8]) -> io::Result<Option<(usize, Option<SocketAddr>)>> {
    let parsed = HeaderResult::parse(buf);
    if parsed.is_incomplete() {
        if buf.len() >= MAX_HEADER {
            return Err(invalid("PROXY header too long"));
        }
        return Ok(None);
    }
    header_info(parsed).map(Some)
}

fn header_info(parsed: HeaderResult<'_>) -> io::Result<(usize, Option<SocketAddr>)> {
    match parsed {
        HeaderResult::V1(Ok(h)) => {
            let addr = match h.addresses {
                v1::Addresses::Tcp4(a) => Some(SocketAddr::from((a.source_address, a.source_port))),
                v1::Addresses::Tcp6(a) => Some(SocketAddr::from((a.source_address, a.source_port))),
                v1::Addresses::Unknown => None,
            };
            Ok((h.header.len(), addr))
        }
        HeaderResult::V2(Ok(h)) => {
            let addr = match (h.command, h.addresses) {
                (v2::Command::Proxy, v2::Addresses::IPv4(a)) => {
                    Some(SocketAddr::from((a.source_address, a.source_port)))
                }
                (v2::Command::Proxy, v2::Addresses::IPv6(a)) => {
                    Some(SocketAddr::from((a.source_address, a.source_port)))
                }
                _ => None,
            };
            Ok((h.len(), addr))
        }
        HeaderResult::V1(Err(e)) => Err(invalid(&format!("PROXY v1: {e}"))),
        HeaderResult::V2(Err(e)) => Err(invalid(&format!("PROXY v2: {e}"))),
    }
}

fn invalid(msg: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;
    use tokio::net::TcpListener;

    async fn roundtrip(header: &[u8]) -> io::Result<(Option<SocketAddr>, Vec<u8>)> {
        let l = TcpListener::bind("127.0.0.1:0").await?;
        let addr = l.local_addr()?;
        let header = header.to_vec();
        let client = tokio::spawn(async move {
            let mut c = TcpStream::connect(addr).await?;
            c.write_all(&header).await?;
            c.write_all(b"MQTT").await?;
            c.flush().await?;
            Ok::<_, io::Error>(c)
        });
        let (mut s, _) = l.accept().await?;
        let src = read_header(&mut s).await?;
        let mut rest = [0u8; 4];
        s.read_exact(&mut rest).await?;
        let _c = client.await.map_err(io::Error::other)??;
        Ok((src, rest.to_vec()))
    }

    #[tokio::test]
    async fn v1_tcp4() {
        let (src, rest) = roundtrip(b"PROXY TCP4 203.0.113.7 10.0.0.1 51234 1883\r\n")
            .await
            .expect("parsed");
        assert_eq!(src, Some("203.0.113.7:51234".parse().expect("addr")));
        assert_eq!(rest, b"MQTT");
    }

    #[tokio::test]
    async fn v2_tcp6() {
        let addrs: v2::Addresses = (
            "[2001:db8::1]:4000".parse::<SocketAddr>().expect("addr"),
            "[2001:db8::2]:1883".parse::<SocketAddr>().expect("addr"),
        )
            .into();
        let header = v2::Builder::with_addresses(
            v2::Version::Two | v2::Command::Proxy,
            v2::Protocol::Stream,
            addrs,
        )
        .build()
        .expect("builds");
        let (src, rest) = roundtrip(&header).await.expect("parsed");
        assert_eq!(src, Some("[2001:db8::1]:4000".parse().expect("addr")));
        assert_eq!(rest, b"MQTT");
    }

    #[tokio::test]
    async fn garbage_is_refused() {
        assert!(roundtrip(b"GET / HTTP/1.1\r\n\r\n").await.is_err());
    }
}
