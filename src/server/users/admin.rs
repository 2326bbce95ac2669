//! The admin API's operations on users: each change is checked, made durable in the state
//! directory (when there is one), and only then applied, one change at a time, so what
//! is stored is what runs, in the same order.

use std::net::IpAddr;
use std::sync::Arc;

use super::{PlanChange, UserEntry, UserUsage, UserView, Users, UsersError, check_name};
use crate::server::state::UserState;
use crate::store::StoreError;

pub struct UserAdmin {
    pub users: Arc<Users>,
    state: Option<Arc<UserState>>,
    changes: tokio::sync::Mutex<()>,
}

/// Why a change was not made.
#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    #[error(transparent)]
    Users(#[from] UsersError),
    #[error("the state directory cannot be written, nothing changed: {0}")]
    Store(#[from] StoreError),
}

/// A new user, as the admin API receives it.
#[derive(Debug, Clone)]
pub struct NewUser {
    pub name: String,
    pub password: String,
    pub plan: super::Plan,
}

impl UserAdmin {
    pub fn new(users: Arc<Users>, state: Option<Arc<UserState>>) -> UserAdmin {
        UserAdmin { users, state, changes: tokio::sync::Mutex::new(()) }
    }

    pub async fn add(&self, new: NewUser) -> Result<UserView, AdminError> {
        check_name(&new.name)?;
        if new.password.is_empty() {
            return Err(UsersError::EmptyPassword.into());
        }
        let _one_at_a_time = self.changes.lock().await;
        if self.users.get(&new.name).is_some() {
            return Err(UsersError::NameTaken(new.name).into());
        }
        let entry = UserEntry::new(&new.name, &new.password, new.plan);
        if let Some(other) = self.users.find(entry.hash.as_bytes()) {
            return Err(UsersError::SamePassword(other.name.clone(), entry.name).into());
        }
        if let Some(state) = &self.state {
            state.save_user(&entry).await?;
        }
        Ok(self.users.add(entry)?.view())
    }

    pub async fn update(
        &self,
        name: &str,
        password: Option<&str>,
        change: &PlanChange,
    ) -> Result<UserView, AdminError> {
        let _one_at_a_time = self.changes.lock().await;
        let entry = self.users.updated(name, password, change)?;
        if let Some(state) = &self.state {
            state.save_user(&entry).await?;
        }
        Ok(self.users.update(entry)?.view())
    }

    pub async fn remove(&self, name: &str) -> Result<(), AdminError> {
        let _one_at_a_time = self.changes.lock().await;
        if self.users.get(name).is_none() {
            return Err(UsersError::NoSuchUser(name.to_string()).into());
        }
        if let Some(state) = &self.state {
            state.save_removal(name).await?;
        }
        self.users.remove(name)?;
        Ok(())
    }

    /// Closes `name`'s sessions (from `ip` only, if given); returns how many.
    pub fn kick(&self, name: &str, ip: Option<IpAddr>) -> Result<usize, AdminError> {
        let user = self.users.get(name).ok_or_else(|| UsersError::NoSuchUser(name.to_string()))?;
        let closed = user.cut(super::Cut::Kicked, ip);
        log::info!("user {name}: kicked by the admin API: {closed} sessions closed");
        Ok(closed)
    }

    pub fn get(&self, name: &str) -> Option<UserView> {
        self.users.get(name).map(|user| user.view())
    }

    /// A page of users by name (see [`Users::page`]).
    pub fn list(&self, after: Option<&str>, limit: usize) -> Vec<UserView> {
        self.users.page(after, limit).iter().map(|user| user.view()).collect()
    }

    /// A page of usage since the last clear; `clear` starts those users' counts again.
    pub fn stats(&self, after: Option<&str>, limit: usize, clear: bool) -> Vec<UserUsage> {
        self.users.page(after, limit).iter().map(|user| user.usage(clear)).collect()
    }
}
