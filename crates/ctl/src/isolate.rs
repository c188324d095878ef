//! `quorate ctl isolate NAME --reason TEXT` and `quorate ctl unisolate NAME` (ADR 0009 §1): the
//! request goes to a member that is not isolated (the leader when it answers), which hands it
//! to the leader. The leader refuses an isolation that would cost the quorum, with the reason.

use crate::collect::{collect, http_post};
use crate::Options;

/// Who runs the command, as the isolation records it: `user@host`.
pub fn operator() -> String {
    let user = std::env::var("USER").or_else(|_| std::env::var("LOGNAME")).unwrap_or_else(|_| "unknown".into());
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").map(|h| h.trim().to_string());
    match host {
        Ok(h) if !h.is_empty() => format!("{user}@{h}"),
        _ => user,
    }
}

/// POST `body` to `path` on a member that serves; the exit code (0 done, 1 refused or failed).
async fn ask(opts: &Options, path: &str, body: serde_json::Value, done: impl Fn(&serde_json::Value) -> String) -> i32 {
    let view = collect(opts).await;
    // The leader if it answers, else any member that serves, else any that answers at all (an
    // isolated member hands the request to the leader too: the way back when every member
    // that answers is isolated).
    let answers = |m: &&crate::MemberView| m.reachable && m.http_addr.is_some();
    let serving = |m: &&crate::MemberView| answers(m) && m.isolated.is_none();
    let via = view
        .members
        .iter()
        .filter(serving)
        .find(|m| m.role.as_deref() == Some("leader"))
        .or_else(|| view.members.iter().find(serving))
        .or_else(|| view.members.iter().find(answers));
    let Some(via) = via else {
        eprintln!("Error: no member answers (endpoints: {})", opts.endpoints.join(","));
        return 1;
    };
    let addr = via.http_addr.clone().expect("filtered");
    let (code, reply) = match http_post(opts, &addr, path, &body.to_string(), opts.command_timeout * 3).await {
        Ok(r) => r,
        Err(e) => {
            eprintln!("Error: {addr}{path}: {e}");
            return 1;
        }
    };
    let reply: serde_json::Value = serde_json::from_str(&reply).unwrap_or(serde_json::json!({ "raw": reply }));
    if opts.json {
        println!("{}", serde_json::to_string_pretty(&reply).unwrap_or_default());
    }
    if code != 200 {
        let msg = reply["error"]["message"].as_str().map_or_else(|| reply.to_string(), String::from);
        eprintln!("Error: {msg}");
        return 1;
    }
    if !opts.json {
        println!("{}", done(&reply));
    }
    0
}

pub async fn isolate(opts: &Options, member: &str, reason: &str) -> i32 {
    let body = serde_json::json!({ "member": member, "reason": reason, "by": operator() });
    ask(opts, "/v1/member/isolate", body, |r| {
        let i = &r["isolation"];
        format!(
            "member {member} ({}) isolated since {} by {}: {}\n\
             It serves no client request; the leader demotes it to a learner that keeps replicating.\n\
             Undo with `quorate ctl unisolate {member}`.",
            r["member"].as_str().unwrap_or("?"),
            i["since"].as_str().unwrap_or("?"),
            i["by"].as_str().unwrap_or("?"),
            i["reason"].as_str().unwrap_or("?"),
        )
    })
    .await
}

pub async fn unisolate(opts: &Options, member: &str) -> i32 {
    let body = serde_json::json!({ "member": member });
    ask(opts, "/v1/member/unisolate", body, |r| {
        format!(
            "member {member} ({}) is no longer isolated: it serves clients again, and the leader promotes it back \
             to a voter once it has caught up",
            r["member"].as_str().unwrap_or("?")
        )
    })
    .await
}
