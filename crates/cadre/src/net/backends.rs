//! The two implementations of [`Network`]: real tokio TCP and turmoil's simulated TCP (feature
//! `testing`).

use std::io;
use std::net::SocketAddr;

use futures::future::BoxFuture;
use futures::FutureExt;

use super::{BoxRead, BoxWrite, Listener, Network};

/// Real TCP sockets (with `TCP_NODELAY`: batching comes from the writers, not from Nagle).
#[derive(Clone, Copy, Debug, Default)]
pub struct TokioNet;

struct TokioListener(tokio::net::TcpListener);

impl Network for TokioNet {
    fn bind(&self, addr: SocketAddr) -> BoxFuture<'static, io::Result<Box<dyn Listener>>> {
        async move {
            let l = tokio::net::TcpListener::bind(addr).await?;
            Ok(Box::new(TokioListener(l)) as Box<dyn Listener>)
        }
        .boxed()
    }

    fn connect(&self, addr: SocketAddr) -> BoxFuture<'static, io::Result<(BoxRead, BoxWrite)>> {
        async move {
            let s = tokio::net::TcpStream::connect(addr).await?;
            s.set_nodelay(true)?;
            let (r, w) = s.into_split();
            Ok((Box::new(r) as BoxRead, Box::new(w) as BoxWrite))
        }
        .boxed()
    }
}

impl Listener for TokioListener {
    fn local_addr(&self) -> io::Result<SocketAddr> {
        self.0.local_addr()
    }

    fn accept(&self) -> BoxFuture<'_, io::Result<(BoxRead, BoxWrite, SocketAddr)>> {
        async move {
            let (s, remote) = self.0.accept().await?;
            s.set_nodelay(true)?;
            let (r, w) = s.into_split();
            Ok((Box::new(r) as BoxRead, Box::new(w) as BoxWrite, remote))
        }
        .boxed()
    }
}

/// turmoil's simulated TCP; only usable inside a turmoil simulation host (feature `testing`).
#[cfg(feature = "testing")]
#[derive(Clone, Copy, Debug, Default)]
pub struct TurmoilNet;

#[cfg(feature = "testing")]
struct TurmoilListener(turmoil::net::TcpListener);

#[cfg(feature = "testing")]
impl Network for TurmoilNet {
    fn bind(&self, addr: SocketAddr) -> BoxFuture<'static, io::Result<Box<dyn Listener>>> {
        async move {
            let l = turmoil::net::TcpListener::bind(addr).await?;
            Ok(Box::new(TurmoilListener(l)) as Box<dyn Listener>)
        }
        .boxed()
    }

    fn connect(&self, addr: SocketAddr) -> BoxFuture<'static, io::Result<(BoxRead, BoxWrite)>> {
        async move {
            let s = turmoil::net::TcpStream::connect(addr).await?;
            let (r, w) = s.into_split();
            Ok((Box::new(r) as BoxRead, Box::new(w) as BoxWrite))
        }
        .boxed()
    }
}

#[cfg(feature = "testing")]
impl Listener for TurmoilListener {
    fn local_addr(&self) -> io::Result<SocketAddr> {
        self.0.local_addr()
    }

    fn accept(&self) -> BoxFuture<'_, io::Result<(BoxRead, BoxWrite, SocketAddr)>> {
        async move {
            let (s, remote) = self.0.accept().await?;
            let (r, w) = s.into_split();
            Ok((Box::new(r) as BoxRead, Box::new(w) as BoxWrite, remote))
        }
        .boxed()
    }
}
