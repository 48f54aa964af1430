//! The one response body type: fixed bytes, or an upstream body, which carries its lease and
//! returns the connection to the pool when the last byte has gone by.

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};

use crate::upstream::{http1, Lease, ResponseBody};

#[derive(Debug)]
pub enum ProxyBody {
    Fixed(Option<Bytes>),
    Upstream(ResponseBody),
}

impl ProxyBody {
    pub fn empty() -> ProxyBody {
        ProxyBody::Fixed(None)
    }

    pub fn fixed(bytes: impl Into<Bytes>) -> ProxyBody {
        let bytes = bytes.into();
        ProxyBody::Fixed((!bytes.is_empty()).then_some(bytes))
    }

    /// The body of the response the lease's connection is reading.
    pub fn upstream(lease: Lease) -> ProxyBody {
        ProxyBody::Upstream(ResponseBody::new(lease))
    }
}

impl Body for ProxyBody {
    type Data = Bytes;
    type Error = http1::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, http1::Error>>> {
        match self.get_mut() {
            ProxyBody::Fixed(bytes) => Poll::Ready(bytes.take().map(|b| Ok(Frame::data(b)))),
            ProxyBody::Upstream(body) => Pin::new(body).poll_frame(cx),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            ProxyBody::Fixed(bytes) => bytes.is_none(),
            ProxyBody::Upstream(body) => body.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            ProxyBody::Fixed(bytes) => {
                SizeHint::with_exact(bytes.as_ref().map_or(0, |b| b.len() as u64))
            }
            ProxyBody::Upstream(body) => body.size_hint(),
        }
    }
}
