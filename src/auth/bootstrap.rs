//! The bootstrap admin: created at start-up (with `admin`, `read`, `write`) when missing, its
//! password reset when the configured one no longer verifies, as the Python relay does. Runs on
//! shard 0 and retries until the user state is reachable (Valkey may still be starting).

use std::rc::Rc;
use std::time::Duration;

use super::{password, Permission, Permissions};
use crate::shard::Shard;

pub async fn ensure_admin(shard: Rc<Shard>) {
    let Some(admin) = shard.auth.config.bootstrap_admin.clone() else {
        return;
    };
    let mut delay = Duration::from_millis(100);
    loop {
        match ensure_once(&shard, &admin).await {
            Ok(()) => return,
            Err(e) => {
                tracing::warn!(error = %e, "bootstrap admin not ensured yet; retrying");
                glommio::timer::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(5));
            }
        }
        if shard.is_shutting_down() {
            return;
        }
    }
}

async fn ensure_once(
    shard: &Shard,
    admin: &crate::config::BootstrapAdmin,
) -> Result<(), super::AuthError> {
    let auth = &shard.auth;
    let password_text = admin.password.expose().to_owned();
    match auth.store.user_by_name(&admin.username).await? {
        Some(mut user) => {
            let verifies =
                password::verify_off_shard(password_text.clone(), user.password_hash.clone()).await;
            if !verifies {
                user.password_hash = password::hash_off_shard(password_text).await;
                auth.update_user(&user).await?;
                tracing::info!(username = %admin.username, "bootstrap admin password reset");
            }
        }
        None => {
            let email = admin
                .email
                .clone()
                .unwrap_or_else(|| format!("{}@example.com", admin.username));
            let every = Permissions::default()
                .with(Permission::Admin)
                .with(Permission::Read)
                .with(Permission::Write);
            auth.create_user(&admin.username, &email, &password_text, every)
                .await?;
            tracing::info!(username = %admin.username, "bootstrap admin created");
        }
    }
    Ok(())
}
