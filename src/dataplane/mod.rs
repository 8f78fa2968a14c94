pub mod l4;
