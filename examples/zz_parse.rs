use std::time::Instant;
fn main() {
    let p = deskline::phone::PhoneParser::new("UA").unwrap();
    let fmts = [
        "+380 44 123 45 67",
        "044 123-45-67",
        "380441234567",
        "+380441234567",
        "(044) 123-45-67",
    ];
    let n = 200_000;
    let t = Instant::now();
    let mut s = 0u64;
    for i in 0..n {
        s = s.wrapping_add(p.parse(fmts[i % 5]).unwrap().digits());
    }
    println!("parse {:?}/op {s}", t.elapsed() / n as u32);
    let ua: phonenumber::country::Id = "UA".parse().unwrap();
    let t = Instant::now();
    for i in 0..n {
        let x = phonenumber::parse(Some(ua), fmts[i % 5]).unwrap();
        s = s.wrapping_add(x.national().value());
    }
    println!("raw parse {:?}/op {s}", t.elapsed() / n as u32);
}
