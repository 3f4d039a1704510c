//! The throwaway PostgreSQL the PostgreSQL store's tests run on (`common/pg.rs`): a
//! server of this test binary's own, and a database of its own for each caller.

mod common;

use sqlx::Connection as _;

#[tokio::test]
async fn each_caller_gets_a_database_of_its_own_on_a_throwaway_server() {
    let (a, b) = tokio::join!(common::pg::database(), common::pg::database());
    assert_ne!(a, b);
    let mut first = sqlx::PgConnection::connect(&a).await.unwrap();
    for statement in ["CREATE TABLE kept (x int)", "INSERT INTO kept VALUES (7)"] {
        sqlx::query(statement).execute(&mut first).await.unwrap();
    }
    let kept: i32 = sqlx::query_scalar("SELECT x FROM kept")
        .fetch_one(&mut first)
        .await
        .unwrap();
    assert_eq!(kept, 7);
    let mut second = sqlx::PgConnection::connect(&b).await.unwrap();
    let seen: Option<String> = sqlx::query_scalar("SELECT to_regclass('kept')::text")
        .fetch_one(&mut second)
        .await
        .unwrap();
    assert_eq!(seen, None, "the other database has no such table");
    // Settings made for tests, not for keeping data.
    let fsync: String = sqlx::query_scalar("SHOW fsync")
        .fetch_one(&mut second)
        .await
        .unwrap();
    if std::env::var("ZAPGATE_TEST_DATABASE_URL").is_err() {
        assert_eq!(fsync, "off");
    }
}
