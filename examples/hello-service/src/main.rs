fn main() { println!("hello from kiln"); }
