//! Batch statements sent to the target without waiting for their results, so the stream is read
//! and the next batch planned while the server runs the previous ones. The server runs a
//! session's statements in the order they arrive, so order needs no waiting; only the commit
//! (and an error report) waits for the results.

use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::Poll;

use bytes::{BufMut, Bytes, BytesMut};
use tokio_postgres::types::{to_sql_checked, IsNull, Kind, ToSql, Type};
use tokio_postgres::{Client, Statement};

type Done = Pin<Box<dyn Future<Output = Result<u64, tokio_postgres::Error>> + Send>>;

/// One array parameter of text values that owns them (shared, not copied), so a statement's
/// parameters live as long as its unsent request has to. Sent as `text[]`, or as `int8[]`,
/// `int4[]` or `int2[]` for integer columns (see [`crate::apply::sql::param_type`]): the values
/// are parsed here and the server reads binary integers instead of parsing each one.
#[derive(Debug)]
pub struct TextArray(pub Vec<Option<Bytes>>);

/// An integer the target's column is too narrow for (the other side's is wider), found while
/// encoding it here: the target refuses it as the server would have (see
/// [`crate::sync`]'s refusals), instead of the statement failing as if the connection had.
#[derive(Debug, thiserror::Error)]
#[error("value {value} is out of range for type {ty} (SQLSTATE 22003)")]
pub struct OutOfRange {
    pub value: i64,
    pub ty: &'static str,
}

impl ToSql for TextArray {
    fn to_sql(
        &self,
        ty: &Type,
        out: &mut BytesMut,
    ) -> Result<IsNull, Box<dyn std::error::Error + Sync + Send>> {
        let Kind::Array(member) = ty.kind() else {
            return Err(format!("{ty} is not an array type").into());
        };
        postgres_protocol::types::array_to_sql(
            Some(postgres_protocol::types::ArrayDimension {
                len: i32::try_from(self.0.len())?,
                lower_bound: 1,
            }),
            member.oid(),
            self.0.iter(),
            |v, w| {
                let Some(b) = v else {
                    return Ok(postgres_protocol::IsNull::Yes);
                };
                let int = || -> Result<i64, Box<dyn std::error::Error + Sync + Send>> {
                    let text = std::str::from_utf8(b)?;
                    text.parse()
                        .map_err(|_| format!("`{text}` is not a value of type {member}").into())
                };
                match *member {
                    Type::INT8 => w.put_i64(int()?),
                    Type::INT4 => {
                        let v = int()?;
                        let ty = "integer";
                        w.put_i32(i32::try_from(v).map_err(|_| OutOfRange { value: v, ty })?)
                    }
                    Type::INT2 => {
                        let v = int()?;
                        let ty = "smallint";
                        w.put_i16(i16::try_from(v).map_err(|_| OutOfRange { value: v, ty })?)
                    }
                    _ => w.put_slice(b),
                }
                Ok(postgres_protocol::IsNull::No)
            },
            out,
        )?;
        Ok(IsNull::No)
    }

    fn accepts(ty: &Type) -> bool {
        [
            Type::TEXT_ARRAY,
            Type::INT8_ARRAY,
            Type::INT4_ARRAY,
            Type::INT2_ARRAY,
        ]
        .contains(ty)
    }

    to_sql_checked!();
}

/// A statement on its way, with what its result is checked against.
struct Sent<T> {
    // Behind a mutex only to be `Sync` (the applier is shared by reference across awaits); it is
    // only ever reached through `&mut`, so never locked.
    done: std::sync::Mutex<Done>,
    what: T,
}

/// Statements sent and not yet answered, oldest first; at most `depth` of them.
pub struct Pipeline<T> {
    sent: VecDeque<Sent<T>>,
    depth: usize,
}

impl<T> Pipeline<T> {
    pub fn new(depth: usize) -> Self {
        Pipeline {
            sent: VecDeque::new(),
            depth,
        }
    }

    /// Send `stmt` now; its result comes back from [`Pipeline::next`] (or at once, when the queue
    /// is full, for the oldest one). The first poll is what sends: tokio-postgres hands the
    /// encoded request to the connection task there, so requests reach the server in the order
    /// of these calls.
    pub async fn send(
        &mut self,
        client: &Arc<Client>,
        stmt: &Statement,
        params: Vec<TextArray>,
        what: T,
    ) -> Vec<(T, Result<u64, tokio_postgres::Error>)> {
        let (client, stmt) = (client.clone(), stmt.clone());
        let mut done: Done = Box::pin(async move { client.execute_raw(&stmt, params).await });
        let first = std::future::poll_fn(|cx| Poll::Ready(done.as_mut().poll(cx))).await;
        let mut finished = Vec::new();
        match first {
            Poll::Ready(r) => finished.push((what, r)),
            Poll::Pending => self.sent.push_back(Sent {
                done: std::sync::Mutex::new(done),
                what,
            }),
        }
        while self.sent.len() > self.depth {
            finished.extend(self.next().await);
        }
        finished
    }

    /// The oldest statement's result, waiting for it; `None` when nothing is outstanding.
    pub async fn next(&mut self) -> Option<(T, Result<u64, tokio_postgres::Error>)> {
        let s = self.sent.pop_front()?;
        let done = s.done.into_inner().unwrap_or_else(|p| p.into_inner());
        Some((s.what, done.await))
    }

    /// Forget what is outstanding (the transaction is being rolled back anyway).
    pub fn clear(&mut self) {
        self.sent.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_array_encodes_like_tokio_postgres_own_text_arrays() {
        let ours = TextArray(vec![
            Some(Bytes::from_static(b"ab")),
            None,
            Some(Bytes::new()),
        ]);
        let theirs: Vec<Option<&str>> = vec![Some("ab"), None, Some("")];
        let (mut a, mut b) = (BytesMut::new(), BytesMut::new());
        ours.to_sql(&Type::TEXT_ARRAY, &mut a).unwrap();
        theirs.to_sql(&Type::TEXT_ARRAY, &mut b).unwrap();
        assert_eq!(a, b);
        assert!(TextArray::accepts(&Type::TEXT_ARRAY));
        assert!(!TextArray::accepts(&Type::NUMERIC_ARRAY));
    }

    #[test]
    fn integer_arrays_are_parsed_and_sent_binary_and_bad_text_is_an_error() {
        let ours = TextArray(vec![
            Some(Bytes::from_static(b"-9223372036854775808")),
            None,
            Some(Bytes::from_static(b"42")),
        ]);
        let theirs: Vec<Option<i64>> = vec![Some(i64::MIN), None, Some(42)];
        let (mut a, mut b) = (BytesMut::new(), BytesMut::new());
        ours.to_sql(&Type::INT8_ARRAY, &mut a).unwrap();
        theirs.to_sql(&Type::INT8_ARRAY, &mut b).unwrap();
        assert_eq!(a, b);
        let small = TextArray(vec![Some(Bytes::from_static(b"-7"))]);
        let (mut a, mut b) = (BytesMut::new(), BytesMut::new());
        small.to_sql(&Type::INT2_ARRAY, &mut a).unwrap();
        vec![Some(-7i16)].to_sql(&Type::INT2_ARRAY, &mut b).unwrap();
        assert_eq!(a, b);
        let e = TextArray(vec![Some(Bytes::from_static(b"4x"))])
            .to_sql(&Type::INT4_ARRAY, &mut BytesMut::new())
            .err()
            .unwrap();
        assert_eq!(e.to_string(), "`4x` is not a value of type int4");
        assert!(TextArray(vec![Some(Bytes::from_static(b"70000"))])
            .to_sql(&Type::INT2_ARRAY, &mut BytesMut::new())
            .is_err());
    }
}
