//! The one response body type: fixed bytes, or an upstream body that carries its lease and
//! returns the connection to the pool when the last byte has gone by.

use std::pin::Pin;
use std::task::{ready, Context, Poll};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;

use crate::upstream::Lease;

#[derive(Debug)]
pub enum ProxyBody {
    Fixed(Option<Bytes>),
    Upstream {
        body: Incoming,
        /// `None` once released; dropping it unreleased closes the upstream connection.
        lease: Option<Lease>,
    },
}

impl ProxyBody {
    pub fn empty() -> ProxyBody {
        ProxyBody::Fixed(None)
    }

    pub fn fixed(bytes: impl Into<Bytes>) -> ProxyBody {
        let bytes = bytes.into();
        ProxyBody::Fixed((!bytes.is_empty()).then_some(bytes))
    }

    pub fn upstream(body: Incoming, lease: Lease) -> ProxyBody {
        // hyper never polls a body that is empty from the start (HEAD, 204, 304,
        // Content-Length: 0), so such a lease is released here.
        let lease = if body.is_end_stream() {
            lease.release();
            None
        } else {
            Some(lease)
        };
        ProxyBody::Upstream { body, lease }
    }
}

impl Body for ProxyBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        match self.get_mut() {
            ProxyBody::Fixed(bytes) => Poll::Ready(bytes.take().map(|b| Ok(Frame::data(b)))),
            ProxyBody::Upstream { body, lease } => {
                let frame = ready!(Pin::new(&mut *body).poll_frame(cx));
                match &frame {
                    None => release(lease),
                    Some(Ok(_)) if body.is_end_stream() => release(lease),
                    Some(Ok(_)) => {}
                    // A broken response must not be reused: dropping the lease closes it.
                    Some(Err(_)) => drop(lease.take()),
                }
                Poll::Ready(frame)
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            ProxyBody::Fixed(bytes) => bytes.is_none(),
            ProxyBody::Upstream { body, .. } => body.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            ProxyBody::Fixed(bytes) => {
                SizeHint::with_exact(bytes.as_ref().map_or(0, |b| b.len() as u64))
            }
            ProxyBody::Upstream { body, .. } => body.size_hint(),
        }
    }
}

fn release(lease: &mut Option<Lease>) {
    if let Some(lease) = lease.take() {
        lease.release();
    }
}
