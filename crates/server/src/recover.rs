//! `GET /v1/member/recovery` and `POST /v1/member/recover`: what `quorate ctl recover` asks of
//! each survivor of a quorum loss, and the plan it has each apply (ADR 0009 §2). A survivor that
//! applies a plan stops Raft, writes it, answers, and re-executes itself in place: same PID,
//! same arguments, its listeners bound again.

use std::sync::Arc;

use axum::extract::State;
use axum::response::{IntoResponse, Response};
use axum::Json;
use quorate_consensus::recovery::{Applied, RecoveryPlan};
use quorate_consensus::ConsensusError;
use serde_json::json;

use crate::http::HttpState;

/// How long the answer has to leave before the process is replaced.
const ANSWER_GRACE: std::time::Duration = std::time::Duration::from_millis(300);

pub async fn info(State(s): State<Arc<HttpState>>) -> Response {
    Json(s.member().recovery_info().await).into_response()
}

pub async fn recover(State(s): State<Arc<HttpState>>, Json(plan): Json<RecoveryPlan>) -> Response {
    match s.member().apply_recovery(&plan).await {
        Ok(Applied::Already) => Json(json!({"applied": false, "already": true, "plan": plan.plan_id})).into_response(),
        Ok(Applied::Written) => {
            tracing::warn!(plan = %plan.plan_id, incarnation = plan.incarnation, "recovery written: restarting in place");
            reexec_after_answer();
            Json(json!({"applied": true, "restarting": true, "plan": plan.plan_id, "incarnation": plan.incarnation}))
                .into_response()
        }
        Err(e) => {
            // Raft is stopped once the apply got that far: restart in place, unchanged.
            if matches!(e, ConsensusError::Stopped(_)) {
                reexec_after_answer();
            }
            crate::isolate::refused(e)
        }
    }
}

/// Re-execute once the answer has had time to leave.
fn reexec_after_answer() {
    tokio::spawn(async {
        tokio::time::sleep(ANSWER_GRACE).await;
        reexec();
    });
}

/// Replace this process with a fresh run of the same binary and arguments (`execve`). Every
/// descriptor is close-on-exec, so the listeners and the data files are released first.
pub fn reexec() -> ! {
    use std::os::unix::process::CommandExt;
    let exe = std::env::current_exe().unwrap_or_else(|_| "/proc/self/exe".into());
    let args: Vec<std::ffi::OsString> = std::env::args_os().skip(1).collect();
    let err = std::process::Command::new(&exe).args(&args).exec();
    tracing::error!(error = %err, exe = %exe.display(), "re-executing after a recovery failed; exiting: start the member again");
    std::process::exit(1)
}
