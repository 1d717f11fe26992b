//! Statements sent to the target without waiting for their results, so the stream is read and
//! the next batch planned while the server runs the previous ones. The server runs a session's
//! statements in the order they arrive, so order needs no waiting, and after a failure it
//! refuses everything up to a rollback, so nothing sent behind a failed statement is applied
//! (a failed COMMIT ends its transaction instead: see `Applier::begin_sql`).
//! What the client checks itself (a plain UPDATE's row count, values that did not encode) must
//! be known before a commit is sent behind it.

use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::Poll;

use bytes::{BufMut, Bytes, BytesMut};
use tokio_postgres::types::{to_sql_checked, IsNull, Kind, ToSql, Type};
use tokio_postgres::{Client, Statement};

/// What a statement sent ahead answers: a batch statement its row count, a simple query its
/// messages (a commit's last row carries its WAL positions).
pub enum Answer {
    Count(u64),
    Messages(Vec<tokio_postgres::SimpleQueryMessage>),
}

pub type Done = Pin<Box<dyn Future<Output = Result<Answer, tokio_postgres::Error>> + Send>>;

/// A batch statement, to be sent through a [`Pipeline`].
pub fn execute(client: &Arc<Client>, stmt: &Statement, params: Vec<TextArray>) -> Done {
    let (client, stmt) = (client.clone(), stmt.clone());
    Box::pin(async move { client.execute_raw(&stmt, params).await.map(Answer::Count) })
}

/// A simple query (several statements in one round trip), to be sent through a [`Pipeline`].
pub fn simple(client: &Arc<Client>, sql: String) -> Done {
    let client = client.clone();
    Box::pin(async move { client.simple_query(&sql).await.map(Answer::Messages) })
}

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
    /// Its result, once read by [`Pipeline::alongside`] ahead of its turn.
    result: Option<Result<Answer, tokio_postgres::Error>>,
    what: T,
    heavy: bool,
}

impl<T> Sent<T> {
    /// Its result, reading it if it is in; never polls a future that finished.
    fn poll_result(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> Poll<Result<Answer, tokio_postgres::Error>> {
        if let Some(r) = self.result.take() {
            return Poll::Ready(r);
        }
        self.done
            .get_mut()
            .unwrap_or_else(|p| p.into_inner())
            .as_mut()
            .poll(cx)
    }
}

/// A statement's result, with what it is checked against.
pub type Finished<T> = (T, Result<Answer, tokio_postgres::Error>);

/// Statements sent and not yet answered, oldest first; at most `depth` heavy ones (batch
/// statements, each holding a batch's encoded values) and any number of light ones (a group's
/// opening and commit: a few bytes each, and at most one of each per group).
pub struct Pipeline<T> {
    sent: VecDeque<Sent<T>>,
    depth: usize,
    heavy: usize,
}

impl<T> Pipeline<T> {
    pub fn new(depth: usize) -> Self {
        Pipeline {
            sent: VecDeque::new(),
            depth,
            heavy: 0,
        }
    }

    /// Send `done` now; its result comes back from [`Pipeline::next`] or [`Pipeline::ready`] (or
    /// at once, when too many heavy ones are out, with the older ones, or when it failed before
    /// reaching the server). The first poll is what
    /// sends: tokio-postgres hands the encoded request to the connection task there, so requests
    /// reach the server in the order of these calls.
    pub async fn send(&mut self, mut done: Done, what: T, heavy: bool) -> Vec<Finished<T>> {
        let first = std::future::poll_fn(|cx| Poll::Ready(done.as_mut().poll(cx))).await;
        let mut finished = Vec::new();
        match first {
            // Answered before the server could: it never left (its values did not encode, or
            // the connection is gone). Reported at once, ahead of older ones, so the caller
            // sends nothing after it, above all no commit: the server's transaction has not
            // failed, and would commit without it.
            Poll::Ready(r) => finished.push((what, r)),
            Poll::Pending => {
                self.sent.push_back(Sent {
                    done: std::sync::Mutex::new(done),
                    result: None,
                    what,
                    heavy,
                });
                self.heavy += usize::from(heavy);
            }
        }
        while self.heavy > self.depth {
            finished.extend(self.next().await);
        }
        finished
    }

    /// The oldest statement's result, waiting for it; `None` when nothing is outstanding.
    pub async fn next(&mut self) -> Option<Finished<T>> {
        let mut s = self.sent.pop_front()?;
        self.heavy -= usize::from(s.heavy);
        let r = std::future::poll_fn(|cx| s.poll_result(cx)).await;
        Some((s.what, r))
    }

    /// The oldest statement's result once it is in, without giving it up while waiting: a
    /// `select!` may drop this future and nothing is lost. Never ready when nothing is out.
    pub async fn ready(&mut self) -> Finished<T> {
        let r = std::future::poll_fn(|cx| match self.sent.front_mut() {
            Some(s) => s.poll_result(cx),
            None => Poll::Pending,
        })
        .await;
        let s = self.sent.pop_front().expect("polled above");
        self.heavy -= usize::from(s.heavy);
        (s.what, r)
    }

    /// Await `f`, one of the session's own requests sent behind the statements out, while
    /// reading their results as they come (kept for [`Pipeline::next`] and
    /// [`Pipeline::ready`]). tokio-postgres holds two pieces of a request's answer until it is
    /// read and then stops reading the socket, so an answer that arrives in more pieces (a slow
    /// network, notices between its messages) would otherwise hold up `f`'s forever.
    pub async fn alongside<F: Future>(&mut self, f: F) -> F::Output {
        let mut f = std::pin::pin!(f);
        std::future::poll_fn(|cx| {
            for s in self.sent.iter_mut().filter(|s| s.result.is_none()) {
                if let Poll::Ready(r) = s.poll_result(cx) {
                    s.result = Some(r);
                }
            }
            f.as_mut().poll(cx)
        })
        .await
    }

    pub fn is_empty(&self) -> bool {
        self.sent.is_empty()
    }

    /// Whether any statement out is `what` (checked against its result by the caller).
    pub fn any(&self, what: impl Fn(&T) -> bool) -> bool {
        self.sent.iter().any(|s| what(&s.what))
    }

    /// The newest statement out that `pick` picks something of.
    pub fn newest<R>(&self, pick: impl Fn(&T) -> Option<R>) -> Option<R> {
        self.sent.iter().rev().find_map(|s| pick(&s.what))
    }

    /// Forget what is outstanding (the transaction is being rolled back anyway).
    pub fn clear(&mut self) {
        self.sent.clear();
        self.heavy = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A statement whose answer comes when `tx` is sent (or dropped).
    fn pending(n: u64) -> (tokio::sync::oneshot::Sender<()>, Done) {
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let done: Done = Box::pin(async move {
            let _ = rx.await;
            Ok(Answer::Count(n))
        });
        (tx, done)
    }

    fn order(finished: &[Finished<u32>]) -> Vec<(u32, u64)> {
        finished
            .iter()
            .map(|(w, r)| match r {
                Ok(Answer::Count(n)) => (*w, *n),
                _ => panic!("not a count"),
            })
            .collect()
    }

    #[tokio::test]
    async fn only_heavy_statements_count_against_the_depth_and_answers_come_in_order() {
        let mut p = Pipeline::new(2);
        let (a, da) = pending(10);
        let (b, db) = pending(20);
        let (c, dc) = pending(30);
        let (d, dd) = pending(40);
        assert!(p.send(da, 1, true).await.is_empty());
        assert!(p.send(db, 2, false).await.is_empty());
        assert!(p.send(dc, 3, true).await.is_empty());
        assert!(p.any(|w| *w == 2) && !p.any(|w| *w == 4));
        // A third heavy one: the oldest answers are waited for, up to the first heavy one.
        a.send(()).unwrap();
        assert_eq!(order(&p.send(dd, 4, true).await), [(1, 10)]);
        // One that failed before reaching the server comes back at once, ahead of older ones.
        let early: Done = Box::pin(async { Ok(Answer::Count(50)) });
        assert_eq!(order(&p.send(early, 5, true).await), [(5, 50)]);
        for tx in [b, c, d] {
            tx.send(()).unwrap();
        }
        let mut rest = Vec::new();
        while let Some(f) = p.next().await {
            rest.push(f);
        }
        assert_eq!(order(&rest), [(2, 20), (3, 30), (4, 40)]);
        assert!(p.is_empty());
    }

    #[tokio::test]
    async fn ready_given_up_before_the_answer_loses_nothing() {
        let mut p = Pipeline::new(2);
        let (a, da) = pending(1);
        let (b, db) = pending(2);
        p.send(da, 1u32, true).await;
        p.send(db, 2, false).await;
        let waited = tokio::time::timeout(std::time::Duration::from_millis(20), p.ready()).await;
        assert!(waited.is_err(), "nothing was answered yet");
        b.send(()).unwrap();
        a.send(()).unwrap();
        assert_eq!(order(&[p.ready().await]), [(1, 1)]);
        assert_eq!(order(&[p.ready().await]), [(2, 2)]);
        assert!(p.is_empty());
    }

    #[tokio::test]
    async fn alongside_reads_the_statements_out_and_keeps_their_results_in_order() {
        use std::sync::atomic::{AtomicBool, Ordering};
        let mut p = Pipeline::new(2);
        let read = [
            Arc::new(AtomicBool::new(false)),
            Arc::new(AtomicBool::new(false)),
        ];
        let mut senders = Vec::new();
        for (i, flag) in read.iter().enumerate() {
            let (tx, rx) = tokio::sync::oneshot::channel::<()>();
            let flag = flag.clone();
            let done: Done = Box::pin(async move {
                let _ = rx.await;
                // Only a poll after the answer came gets here.
                flag.store(true, Ordering::SeqCst);
                Ok(Answer::Count(i as u64))
            });
            assert!(p.send(done, i as u32, true).await.is_empty());
            senders.push(tx);
        }
        let (mine, answer) = tokio::sync::oneshot::channel::<u8>();
        let waiter = tokio::spawn(async move {
            let got = p.alongside(async { answer.await.unwrap() }).await;
            (p, got)
        });
        // The statements out are answered while the session's own request waits: they are read.
        for tx in senders {
            tx.send(()).unwrap();
        }
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while !read.iter().all(|f| f.load(Ordering::SeqCst)) {
            assert!(
                std::time::Instant::now() < deadline,
                "not read while waiting"
            );
            tokio::time::sleep(std::time::Duration::from_millis(1)).await;
        }
        mine.send(9).unwrap();
        let (mut p, got) = waiter.await.unwrap();
        assert_eq!(got, 9);
        assert_eq!(order(&[p.ready().await]), [(0, 0)]);
        assert_eq!(order(&[p.next().await.unwrap()]), [(1, 1)]);
        assert!(p.is_empty());
    }

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
